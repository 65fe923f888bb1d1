"""What loading an experiment checks before any work, and whom an error blames (issue 25, items 10 and 16):
every block is built on the meta device and its output shape checked; an error names the `--set` override,
or the file of the `extends` chain, that set the key."""

import textwrap
from pathlib import Path

import pytest
import torch

from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.model import registry

pytestmark = pytest.mark.usefixtures("one_thread")

WIDENING_BLOCKS = """
import torch
from torch import nn
from micro_arch.model.registry import register_block

@register_block("zz_widen", kind="other")
class Widen(nn.Module):
    '''A user's mistake: the projection ends at 2 * d_model.'''
    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, x, state):
        return self.proj(x)

@register_block("zz_pair", kind="other")
class Pair(nn.Module):
    '''Another: returns a tuple.'''
    def __init__(self, d_model: int):
        super().__init__()

    def forward(self, x, state):
        return x, None

@register_block("zz_host_read", kind="other")
class HostRead(nn.Module):
    '''Right width, but reads a value back to the host: cannot run on meta tensors, left to the real forward.'''
    def __init__(self, d_model: int):
        super().__init__()

    def forward(self, x, state):
        return x * float(x.abs().max().item() > -1)
"""


@pytest.fixture
def scratch_registry(monkeypatch):
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def experiment(folder: Path, config: str, blocks: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(textwrap.dedent(config))
    if blocks:
        (folder / "blocks.py").write_text(blocks)
    return folder


def error_of(*args) -> MicroArchError:
    with pytest.raises(MicroArchError) as info:
        load_experiment(*args)
    return info.value


# --- item 10: a block of the wrong width is named, with its spec, when the experiment loads ----------------

@pytest.mark.parametrize("spec, block, got", [
    ("Norm->Attn->+->Norm->zz_widen->+", "zz_widen", "returns shape (1, 8, 64) for an input of shape (1, 8, 32)"),
    ("Norm->zz_pair->+", "zz_pair", "returns a tuple"),
])
def test_a_block_of_the_wrong_width_is_named_with_its_spec(tmp_path, scratch_registry, spec, block, got):
    folder = experiment(tmp_path / "wide", f"""\
        model: {{d_model: 32, n_heads: 2, max_seq_len: 16, layers: [{{spec: "{spec}", repeat: 2}}]}}
        train: {{seq_len: 16}}
        """, WIDENING_BLOCKS)
    err = error_of(folder)
    first, shown, caret = str(err).splitlines()
    assert first.startswith(f"{folder / 'config.yaml'}: model.layers[0].spec: block {block!r} {got}"), first
    assert "must map (batch, seq, d_model) to the same shape" in first
    assert shown.strip() == spec and caret.index("^") == shown.index(block)


def test_the_check_refuses_nothing_it_cannot_run(tmp_path, scratch_registry):
    folder = experiment(tmp_path / "host", """\
        model: {d_model: 32, n_heads: 2, max_seq_len: 16, layers: [{spec: "Norm->zz_host_read->+"}]}
        train: {seq_len: 16}
        """, WIDENING_BLOCKS)
    cfg = load_experiment(folder)
    assert cfg.model.layers[0].spec == "Norm->zz_host_read->+"


def test_the_check_draws_no_random_numbers(tmp_path):
    folder = experiment(tmp_path / "plain", """\
        model: {d_model: 32, n_heads: 2, max_seq_len: 16, dropout: 0.5}
        train: {seq_len: 16}
        """)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_experiment(folder)
    assert torch.equal(torch.rand(3), expected)  # a run's initialisation is what it was before the check


def test_a_block_constructor_error_is_found_when_the_experiment_loads(tmp_path):
    folder = experiment(tmp_path / "kv", """\
        model: {d_model: 32, n_heads: 4, layers: [{spec: "Norm->Attn(n_kv_heads=3)->+"}]}
        """)
    err = error_of(folder)
    assert str(err).startswith(f"{folder / 'config.yaml'}: model.layers[0].spec: bad block string: block "
                               "'attention'")
    assert (err.block, err.argument) == ("attention", "n_kv_heads")  # the fields survive the blame


# --- item 16: the file of the extends chain, or the override, that set the key -----------------------------

def test_an_unknown_key_in_an_extends_parent_names_the_parent(tmp_path):
    experiment(tmp_path / "parent", "model:\n  d_modle: 64\n")
    child = experiment(tmp_path / "child", "extends: ../parent\ntrain: {max_steps: 3}\n")
    message = str(error_of(child))
    assert message.startswith(f"{tmp_path / 'parent' / 'config.yaml'}.model: unknown key 'd_modle'"), message
    assert "child" not in message


def test_a_bad_value_in_a_parent_names_the_parent_and_one_in_the_child_the_child(tmp_path):
    experiment(tmp_path / "parent", "model:\n  d_model: wide\n  n_heads: 2\n")
    child = experiment(tmp_path / "child", "extends: ../parent\n")
    assert str(error_of(child)).startswith(f"{tmp_path / 'parent' / 'config.yaml'}.model.d_model: 'wide'")
    experiment(tmp_path / "child", "extends: ../parent\nmodel: {d_model: 3}\n")  # now the child sets it
    message = str(error_of(child))
    assert message.startswith(f"{tmp_path / 'child' / 'config.yaml'}.model.n_heads: d_model=3 is not divisible")


def test_a_block_string_error_names_the_file_that_wrote_it(tmp_path):
    experiment(tmp_path / "parent", "model:\n  layers: [{spec: 'Norm->Atn->+'}]\n")
    child = experiment(tmp_path / "child", "extends: ../parent\ntrain: {max_steps: 3}\n")
    first = str(error_of(child)).splitlines()[0]
    assert first.startswith(f"{tmp_path / 'parent' / 'config.yaml'}: model.layers[0].spec: bad block string: "
                            "unknown block 'Atn'"), first
    own = experiment(tmp_path / "own", "model:\n  layers: [{spec: 'Norm->Atn->+'}]\n")
    assert str(error_of(own)).startswith(f"{own / 'config.yaml'}: model.layers[0].spec: ")


@pytest.mark.parametrize("override, words", [
    ("model.d_model=130", "model.n_heads: d_model=130 is not divisible by n_heads=4"),
    ("model.n_heads=3", "d_model=64 is not divisible by n_heads=3"),
    ("train.seq_len=999", "train.seq_len=999 is longer than model.max_seq_len=32"),
    ("model.layers.0.spec=Norm->Attn(n_kv_heads=0)->+", "argument n_kv_heads=0 must be at least 1"),
])
def test_a_rule_over_several_keys_blames_the_override_that_broke_it(tmp_path, override, words):
    folder = experiment(tmp_path / "e", "model: {d_model: 64, n_heads: 4, max_seq_len: 32}\ntrain: {seq_len: 32}\n")
    err = error_of(folder, [override])
    message = str(err)
    assert message.startswith(f"--set {override}: "), message
    assert words in message and "config.yaml" not in message
    if "spec" in override:  # blamed, a block's refusal keeps its fields
        assert (err.block, err.argument) == ("attention", "n_kv_heads")
