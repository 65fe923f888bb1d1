"""The block registry: registering, listing, building, experiment blocks.py and entry-point plug-ins."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from micro_arch.errors import MicroArchError
from micro_arch.model import registry
from micro_arch.model.registry import Dims, build_block, get_entry, list_blocks, register_block

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for one test, so test blocks never leak into other tests."""
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def define_scale_block(name="zz_test_scale", kind="mlp"):
    @register_block(name, kind=kind)
    class ZzTestScale(nn.Module):
        """Multiplies by a learned vector, then by `factor`."""

        def __init__(self, d_model: int, factor: float = 1.0, layer_idx: int = 0):
            super().__init__()
            self.d_model, self.factor, self.layer_idx = d_model, factor, layer_idx
            self.weight = nn.Parameter(torch.ones(d_model))

        def forward(self, x, state=None):
            return x * self.weight * self.factor

    return ZzTestScale


def test_register_and_build(scratch_registry):
    cls = define_scale_block()
    entry = get_entry("ZZ_Test_Scale")  # names are case-insensitive
    assert entry.cls is cls and entry.kind == "mlp" and entry.name == "zz_test_scale"
    assert entry.source == __file__
    assert entry.description == "Multiplies by a learned vector, then by `factor`."
    assert list(entry.arguments) == ["d_model", "factor", "layer_idx"]
    block = build_block("zz_test_scale", Dims(d_model=12, n_heads=3, layer_idx=5), factor=2.5)
    assert isinstance(block, cls)
    assert (block.d_model, block.factor, block.layer_idx) == (12, 2.5, 5)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(block(x), 2.5 * x)


def test_build_passes_only_the_dims_a_constructor_names(scratch_registry):
    received = {}

    @register_block("zz_test_picky", kind="other")
    class Picky(nn.Module):
        def __init__(self, d_model: int, n_heads: int, width: int = 3):  # no **kwargs: extra dims would fail
            super().__init__()
            received.update(d_model=d_model, n_heads=n_heads, width=width)

    build_block("zz_test_picky", Dims(d_model=16, n_heads=2, d_ff=99, max_seq_len=7, rope_theta=3.0))
    assert received == {"d_model": 16, "n_heads": 2, "width": 3}
    build_block("zz_test_picky", Dims(d_model=16, n_heads=2), n_heads=8)  # spec arguments beat shared dims
    assert received["n_heads"] == 8


def test_missing_required_argument(scratch_registry):
    @register_block("zz_test_needy", kind="other")
    class Needy(nn.Module):
        def __init__(self, d_model: int, rank: int):
            super().__init__()

    with pytest.raises(MicroArchError, match=r"needs argument\(s\) rank; write e.g. zz_test_needy\(rank=...\)"):
        build_block("zz_test_needy", Dims(d_model=8))
    build_block("zz_test_needy", Dims(d_model=8), rank=2)


def test_constructor_value_error_becomes_microarch_error(scratch_registry):
    @register_block("zz_test_strict", kind="other")
    class Strict(nn.Module):
        def __init__(self, d_model: int, rank: int = 1):
            super().__init__()
            if rank > d_model:
                raise ValueError(f"rank {rank} exceeds d_model {d_model}")

    with pytest.raises(MicroArchError, match="block 'zz_test_strict' with {'rank': 9}: rank 9 exceeds d_model 8"):
        build_block("zz_test_strict", Dims(d_model=8), rank=9)


def test_list_with_wildcard_and_kind(scratch_registry):
    define_scale_block()
    norms = [e.name for e in list_blocks("*norm*")]
    assert "rmsnorm" in norms and "layernorm" in norms and "attention" not in norms
    assert all(e.kind == "norm" for e in list_blocks(kind="norm"))
    assert {"rmsnorm", "layernorm"} <= {e.name for e in list_blocks(kind="norm")}
    mlps = [e.name for e in list_blocks("*", kind="mlp")]
    assert {"gelu_mlp", "swiglu", "zz_test_scale"} <= set(mlps) and "rmsnorm" not in mlps
    assert [e.name for e in list_blocks("ZZ_*")] == ["zz_test_scale"]
    assert list_blocks("zz_*", kind="norm") == []
    everything = list_blocks()
    kinds = [registry.KINDS.index(e.kind) for e in everything]
    assert kinds == sorted(kinds)  # sorted by kind, then name
    with pytest.raises(MicroArchError, match="unknown block kind 'normal'"):
        list_blocks(kind="normal")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(MicroArchError) as info:
        get_entry("swigl")
    assert "unknown block 'swigl'" in str(info.value) and "did you mean: swiglu" in str(info.value)
    with pytest.raises(MicroArchError) as info:
        build_block("layernrm", Dims(d_model=8))
    assert "did you mean: layernorm" in str(info.value)


def test_duplicate_registration(scratch_registry):
    first = define_scale_block()
    assert define_scale_block() is not first  # the same definition again (e.g. a re-import) is fine
    with pytest.raises(MicroArchError, match="registered twice"):
        @register_block("ZZ_TEST_SCALE", kind="mlp")
        class Other(nn.Module):
            pass
    with pytest.raises(MicroArchError, match="registered twice"):
        @register_block("rmsnorm", kind="norm")
        class MyNorm(nn.Module):
            pass
    assert get_entry("rmsnorm").cls.__name__ == "RMSNorm"


def test_bad_registrations(scratch_registry):
    with pytest.raises(MicroArchError, match="kind 'mixer' is not one of"):
        register_block("zz_test_kind", kind="mixer")
    with pytest.raises(MicroArchError, match="not an nn.Module subclass"):
        register_block("zz_test_fn")(lambda x: x)


def test_bad_argument_type_names_the_type(scratch_registry):
    define_scale_block()
    with pytest.raises(MicroArchError, match="factor='big' should be float, not str"):
        build_block("zz_test_scale", Dims(d_model=4), factor="big")
    with pytest.raises(MicroArchError, match="factor=True should be float, not bool"):
        build_block("zz_test_scale", Dims(d_model=4), factor=True)
    assert build_block("zz_test_scale", Dims(d_model=4), factor=2).factor == 2  # an int is a fine float


def test_broken_experiment_blocks_file(tmp_path):
    folder = tmp_path / "broken_exp"
    folder.mkdir()
    (folder / "blocks.py").write_text("import not_a_module_zz\n")
    with pytest.raises(MicroArchError, match="could not import the experiment's blocks: ModuleNotFoundError"):
        registry.load_experiment_blocks(folder)


# --- through the command line: experiment blocks.py, entry points, `blocks PATTERN` ---------------------

EXP_BLOCKS = '''
import torch
from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_exp_gate", kind="other")
class ZzExpGate(nn.Module):
    """A gate defined by the experiment itself."""

    def __init__(self, d_model: int, init: float = 0.5):
        super().__init__()
        self.gate = nn.Parameter(torch.full((d_model,), init))

    def forward(self, x, state=None):
        state.record("gate", self.gate)
        return x * torch.sigmoid(self.gate)
'''

PLUGIN = '''
import torch
from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_plugin_block", kind="ssm")
class ZzPluginBlock(nn.Module):
    """A block from an installed package."""

    def __init__(self, d_model: int, depth: int = 2):
        super().__init__()

    def forward(self, x, state=None):
        return x
'''


def launch(*args, env=None):
    full_env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "micro_arch", *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Start the three CLI runs together; each test reads its own result."""
    tmp = tmp_path_factory.mktemp("registry_cli")
    exp = tmp / "tmp_exp"
    exp.mkdir()
    (exp / "blocks.py").write_text(EXP_BLOCKS)
    (exp / "config.yaml").write_text(textwrap.dedent("""
        model:
          d_model: 16
          n_heads: 2
          layers: [{spec: 'Norm->Attn->+->ZZ_Exp_Gate(init=2.0)->Norm->MLP->+', repeat: 2}]
    """))
    site = tmp / "site"
    (site / "zz_plugin_pkg").mkdir(parents=True)
    (site / "zz_plugin_pkg" / "__init__.py").write_text(PLUGIN)
    dist = site / "zz_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zz-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[micro_arch.blocks]\nzz_plugin = zz_plugin_pkg\nzz_broken = zz_missing_module_pkg\n")
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    procs = {
        "trace": launch("trace", exp, "--set", "model.vocab_size=50", "--batch", "1", "--seq-len", "8"),
        "plugin": launch("blocks", "zz_*", env={"PYTHONPATH": pythonpath}),
        "rms": launch("blocks", "rms*"),
        "own": launch("blocks", "zz_exp*", "--experiment", exp),
    }
    return {name: _finish(p) for name, p in procs.items()}


def _finish(proc):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_experiment_blocks_py_is_loaded_and_traced(cli):
    code, out, err = cli["trace"]
    assert code == 0, err
    assert "ZzExpGate" in out and "gate (16,)" in out  # the module in the tree, and what it recorded
    assert "rmsnorm->attention->+->zz_exp_gate(init=2.0)->rmsnorm->swiglu->+" in out


def test_entry_point_plugins_are_loaded(cli):
    code, out, err = cli["plugin"]
    assert code == 0, err
    assert "zz_plugin_block" in out and "ssm" in out and "depth=2" in out
    assert "zz_plugin_pkg" in out  # where it was defined
    # a broken plug-in is reported and does not take the others down
    assert "could not load blocks from entry point zz_broken" in err
    assert "Traceback" not in err


def test_blocks_lists_an_experiments_own_blocks_when_named(cli):
    code, out, err = cli["own"]
    assert code == 0, err
    assert "zz_exp_gate" in out and "init=0.5" in out and "blocks.py" in out


def test_blocks_pattern_lists_matching_blocks_only(cli):
    code, out, err = cli["rms"]
    assert code == 0, err
    assert "rmsnorm" in out and "blocks/norms.py" in out and "eps=1e-05 (> 0)" in out  # with its bound
    assert "attention" not in out and "layernorm" not in out and "swiglu" not in out
    assert "zz_plugin_block" not in out  # the plug-in is only visible where it is installed


# --- issue 25, items 6 and 7: bounds beside the argument, the shared dimensions' rules, the error's fields ----

def test_a_bound_declared_beside_the_argument_is_enforced(scratch_registry):
    from typing import Annotated

    from annotated_types import Ge, Interval

    @register_block("zz_test_bounded", kind="other")
    class Bounded(nn.Module):
        def __init__(self, d_model: int, rank: Annotated[int, Ge(1)] = 4,
                     share: Annotated[float | None, Interval(gt=0, le=1)] = None):
            super().__init__()
            self.rank, self.share = rank, share

    assert build_block("zz_test_bounded", Dims(d_model=8), rank=1, share=1.0).rank == 1
    for kwargs, words in ((dict(rank=0), "argument rank=0 must be at least 1"),
                          (dict(share=0.0), "argument share=0.0 must be in (0, 1] (or null)"),
                          (dict(share=1.5), "share=1.5 must be in (0, 1]")):
        with pytest.raises(registry.BlockArgumentError) as info:
            build_block("zz_test_bounded", Dims(d_model=8), **kwargs)
        assert words in str(info.value)
        assert (info.value.block, info.value.argument) == ("zz_test_bounded", next(iter(kwargs)))


def test_a_bound_in_a_file_with_postponed_annotations(scratch_registry, tmp_path):
    folder = tmp_path / "postponed"
    folder.mkdir()
    (folder / "blocks.py").write_text(textwrap.dedent("""\
        from __future__ import annotations
        from typing import Annotated
        from annotated_types import Gt
        from torch import nn
        from micro_arch.model.registry import register_block

        @register_block("zz_test_postponed", kind="other")
        class Postponed(nn.Module):
            def __init__(self, d_model: int, scale: Annotated[float, Gt(0)] = 1.0):
                super().__init__()
        """))
    registry.load_experiment_blocks(folder)
    with pytest.raises(MicroArchError, match="argument scale=-2 must be greater than 0"):
        build_block("zz_test_postponed", Dims(d_model=8), scale=-2)


@pytest.mark.parametrize("name", [n for n in registry.DIM_NAMES if n not in ("n_layers", "layer_idx")])
def test_a_shared_dimension_refuses_in_a_block_what_the_model_key_refuses(scratch_registry, name):
    """Dims' rules and config.ModelConfig's checks agree on every probe value: what `model.X: v` refuses,
    `block(X=v)` refuses, and the other way round."""
    from micro_arch.config import ModelConfig, from_dict

    @register_block("zz_test_takes_all", kind="other")
    class TakesAll(nn.Module):
        def __init__(self, d_model: int = 64, n_heads: int = 4, n_kv_heads: int | None = None,
                     head_dim: int | None = None, d_ff: int | None = None, max_seq_len: int = 8,
                     dropout: float = 0.0, positions: str = "rope", rope_theta: float = 1e4,
                     rope_scaling: float = 1.0):
            super().__init__()

    probes = [-1, 0, 1, 2, 0.0, 0.5, 1.0, -0.5, None, "rope", "alibi"]
    for value in probes:
        base = {"d_model": 64, "n_heads": 2, "head_dim": 32, "vocab_size": 10, name: value}
        try:
            from_dict(ModelConfig, base)
            model_refuses = False
        except MicroArchError:
            model_refuses = True
        try:
            registry.check_arguments("zz_test_takes_all", {name: value})
            block_refuses = False
        except registry.BlockArgumentError as err:
            block_refuses = True
            assert err.argument == name
        assert block_refuses == model_refuses, (name, value)


def test_a_constructor_error_keeps_the_argument_as_a_field(scratch_registry):
    with pytest.raises(registry.BlockArgumentError) as info:
        build_block("attention", Dims(d_model=16, n_heads=4), n_kv_heads=3)
    assert (info.value.block, info.value.argument) == ("attention", "n_kv_heads")
    assert isinstance(info.value, ValueError)  # what code that builds the class directly catches

    @register_block("zz_test_plain_error", kind="other")
    class Plain(nn.Module):
        def __init__(self, d_model: int, rank: int = 1):
            super().__init__()
            raise ValueError("rank is wrong")  # says nothing structured: the whole block is blamed

    with pytest.raises(registry.BlockArgumentError) as info:
        build_block("zz_test_plain_error", Dims(d_model=8), rank=2)
    assert (info.value.block, info.value.argument) == ("zz_test_plain_error", None)
