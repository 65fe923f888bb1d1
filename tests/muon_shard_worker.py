"""One rank of the sharded-Muon check, started by torchrun from tests/test_muon.py (not a test itself):
three Muon steps on the same parameters and gradients as one process, counting the matrices this rank
orthogonalised; writes OUT_DIR/rank<R>.pt."""

import os
import sys

import torch
import torch.distributed as dist

from micro_arch.train import muon as muon_mod
from micro_arch.train.muon import Muon


def mixed_params(seed=0):
    """Shapes repeated (batched together), a transposed twin of one and a lone one."""
    torch.manual_seed(seed)
    shapes = [(24, 8), (24, 8), (8, 24), (24, 8), (16, 16), (16, 16), (5, 7)]
    return [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]


def grads_for(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def three_muon_steps() -> list[torch.nn.Parameter]:
    """The check's computation: the same in one process and on each rank."""
    params = mixed_params()
    opt = Muon(params, lr=0.01, weight_decay=0.1, ns_dtype=torch.float32)
    for step in range(3):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        opt.step()
    return params


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    counted = []
    original = muon_mod.newton_schulz_many
    muon_mod.newton_schulz_many = lambda xs, **kw: counted.extend(x.shape[0] for x in xs) or original(xs, **kw)
    params = three_muon_steps()
    torch.save({"params": [p.detach() for p in params], "orthogonalised": sum(counted)},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
