"""The block-string language: parsing, role resolution, and the errors a user sees (in Python and on the CLI)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from micro_arch.config import load_config
from micro_arch.errors import MicroArchError
from micro_arch.model.spec import ADD, BlockCall, parse_chain, resolve_chain, resolve_layer

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"Norm": "rmsnorm", "Attn": "attention", "MLP": "swiglu"}


def names(steps):
    return [s if s == ADD else s.name for s in steps]


# --- parsing and resolving -----------------------------------------------------------------------


def test_chain_of_blocks_and_adds():
    steps = parse_chain("Norm->Attn->+->Norm->MLP->+")
    assert names(steps) == ["Norm", "Attn", ADD, "Norm", "MLP", ADD]
    assert all(isinstance(s, BlockCall) for s in steps if s != ADD)
    assert [s.position for s in steps if s != ADD] == [0, 6, 15, 21]


def test_whitespace_around_tokens_is_ignored():
    assert names(parse_chain("  Norm -> Attn ->+ -> MLP  ")) == ["Norm", "Attn", ADD, "MLP"]


def test_roles_resolve_through_defaults_case_insensitively():
    steps = resolve_chain("norm->ATTN->+->NoRm->mlp->+", DEFAULTS)
    assert names(steps) == ["rmsnorm", "attention", ADD, "rmsnorm", "swiglu", ADD]
    other = resolve_chain("Norm->MLP->+", {"Norm": "LayerNorm", "MLP": "GELU_MLP"})
    assert names(other) == ["layernorm", "gelu_mlp", ADD]


def test_concrete_names_work_directly_in_any_case():
    assert names(resolve_chain("RMSNorm->Attention->+->LayerNorm->SwiGLU->+", {})) == [
        "rmsnorm", "attention", ADD, "layernorm", "swiglu", ADD]


@pytest.mark.parametrize("text,expected", [
    ("Attn(window=64)", {"window": 64}),
    ("Attn(rope_theta=0.5)", {"rope_theta": 0.5}),
    ("Attn(rope_theta=1e6)", {"rope_theta": 1e6}),  # YAML 1.1 would read 1e6 as a string
    ("Attn(qk_norm=true, bias=False)", {"qk_norm": True, "bias": False}),
    ("Attn(positions=none)", {"positions": "none"}),
    ("Attn(positions='rope')", {"positions": "rope"}),
    ("Attn( n_kv_heads = 1 ,window=8 )", {"n_kv_heads": 1, "window": 8}),
    ("Attn(window=null)", {"window": None}),
])
def test_inline_argument_values_are_yaml_scalars(text, expected):
    (call,) = parse_chain(text)
    assert call.kwargs == expected
    for key, value in expected.items():
        assert type(call.kwargs[key]) is type(value), key
    (resolved,) = resolve_chain(text, DEFAULTS)  # and the block accepts them
    assert resolved.kwargs == expected


def test_quoted_exponent_stays_a_string():
    (call,) = parse_chain("Attn(positions='1e3')")
    assert call.kwargs == {"positions": "1e3"}


def test_norm_eps_in_exponent_notation():
    (call,) = resolve_chain("Norm(eps=1e-6)", DEFAULTS)
    assert call.kwargs == {"eps": 1e-6}


def test_role_defaults_with_arguments_merge_and_inline_wins():
    defaults = {**DEFAULTS, "Attn": "attention(qk_norm=true, window=8)"}
    (call,) = resolve_chain("Attn(window=4, bias=true)", defaults)
    assert call.name == "attention"
    assert call.kwargs == {"qk_norm": True, "window": 4, "bias": True}
    (plain,) = resolve_chain("Attn", defaults)
    assert plain.kwargs == {"qk_norm": True, "window": 8}


def test_parallel_branches_resolve_each():
    branches = resolve_layer(["Norm->Attn->+", "Norm->MLP->+"], DEFAULTS)
    assert [names(b) for b in branches] == [["rmsnorm", "attention", ADD], ["rmsnorm", "swiglu", ADD]]
    assert [names(b) for b in resolve_layer("Norm->MLP->+", DEFAULTS)] == [["rmsnorm", "swiglu", ADD]]
    with pytest.raises(MicroArchError, match="empty"):
        resolve_layer([], DEFAULTS)


def test_role_that_maps_to_another_role_is_an_error():
    with pytest.raises(MicroArchError, match="role 'Norm' must map to a registered block, not 'Attn'"):
        resolve_chain("Norm->Attn", {**DEFAULTS, "Norm": "Attn"})


def test_role_that_maps_to_a_chain_is_an_error():
    with pytest.raises(MicroArchError, match="role 'Norm' maps to 'rmsnorm->rmsnorm'"):
        resolve_chain("Norm->Attn", {**DEFAULTS, "Norm": "rmsnorm->rmsnorm"})


# --- errors ---------------------------------------------------------------------------------------

BAD = [
    # text, words the first line must contain, caret column (None: no caret line)
    ("", ["empty"], None),
    ("   ", ["empty"], None),
    ("Norm->", ["missing block"], 6),
    ("->Norm", ["missing block"], 0),
    ("Norm->->Attn", ["missing block"], 6),
    ("Norm->Atn->+", ["unknown block 'Atn'", "did you mean", "Attn"], 6),
    ("Norm->Attn(windw=3)->+", ["no argument 'windw'", "did you mean: window", "it takes: window", "qk_norm"], 11),
    ("Attn(window=abc)", ["window='abc'", "should be int"], 5),
    ("Norm(eps=small)", ["eps='small'", "should be float"], 5),
    # issue 25, items 6 and 7: a block's arguments get the model keys' checks, the caret under the argument
    ("Norm->Attn->+->Norm->MLP(d_ff=-5)->+", ["block 'swiglu'", "argument d_ff=-5", "at least 1 (or null)"], 25),
    ("Norm->Attn(head_dim=-2)->+", ["block 'attention'", "head_dim=-2", "at least 1 (or null)"], 11),
    ("Norm->Attn(head_dim=0)->+", ["block 'attention'", "head_dim=0", "at least 1 (or null)"], 11),
    ("Norm->Attn(n_kv_heads=0)->+", ["block 'attention'", "n_kv_heads=0", "at least 1 (or null)"], 11),
    ("Norm->MLP(d_ff=0)", ["block 'swiglu'", "d_ff=0", "at least 1"], 10),
    ("Norm->Attn(rope_theta=0)->+", ["block 'attention'", "rope_theta=0", "greater than 0"], 11),
    ("layernorm(eps=-1)->Attn->+", ["block 'layernorm'", "eps=-1", "greater than 0"], 10),
    ("Norm->Attn(dropout=1.0)", ["dropout=1.0", "in [0, 1)"], 11),
    ("Norm->Attn(positions=alibi)", ["positions='alibi'", "should be one of 'rope', 'learned', 'none'"], 11),
    ("Norm->Attn(window=0)", ["window=0", "at least 1 (or null)"], 11),
    ("Norm->Attn(n_kv_heads=1, n_kv_heads=2)->+", ["argument n_kv_heads of Attn is given twice", "keep one"], 25),
    ("Norm->Attn(window=3->+", ["'(' is never closed"], 10),
    ("Norm->Attn(window=3))->+", ["')' without a matching '('"], 20),
    ("Norm)->Attn", ["')' without a matching '('"], 4),
    ("+->Norm->Attn", ["'+' must follow a block"], 0),
    ("Norm->Attn->+->+", ["'+' must follow a block"], 15),
    ("Norm->Attn(3)->+", ["needs a name", "key=value"], 11),
    ("Norm->At tn->+", ["not a block name"], 6),
    ("Norm->Attn(window=[1, 2])", ["value '[1' of window is not a YAML scalar"], 11),
    ("Norm->Attn(window=[1])", ["value of window must be a scalar, not a list"], 11),
]


@pytest.mark.parametrize("text,words,column", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_block_strings(text, words, column):
    with pytest.raises(MicroArchError) as info:
        resolve_chain(text, DEFAULTS)
    message = str(info.value)
    first = message.splitlines()[0]
    assert "Traceback" not in message
    for word in words:
        assert word in first, (word, first)
    if column is not None:
        lines = message.splitlines()
        assert lines[1] == "    " + text  # the string itself, then the caret under the culprit
        assert lines[2].rstrip() == "    " + " " * column + "^"


def test_unknown_block_suggests_the_closest_registered_names():
    with pytest.raises(MicroArchError) as info:
        resolve_chain("Norm->rmsnrom", DEFAULTS)
    assert "did you mean: rmsnorm" in str(info.value).splitlines()[0]


def test_non_string_spec():
    with pytest.raises(MicroArchError, match="must be text"):
        parse_chain(42)


# --- the same errors through the command line ------------------------------------------------------

CLI_CASES = {
    "bad_spec": ("model:\n  layers: [{spec: 'Norm->Atn->+->Norm->MLP->+'}]\n",
                 ["unknown block 'Atn'", "did you mean"]),
    "repeat_zero": ("model:\n  layers: [{spec: 'Norm->Attn->+', repeat: 0}]\n",
                    ["repeat", "at least 1"]),
    "unknown_key": ("model:\n  d_modle: 64\n", ["unknown key 'd_modle'", "did you mean: d_model"]),
    "wrong_type": ("model:\n  d_model: wide\n", ["model.d_model", "'wide' should be int"]),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run every CLI case at once (each is a fresh Python with torch to import)."""
    root = tmp_path_factory.mktemp("spec_cli")
    procs = {}
    for name, (config, _) in CLI_CASES.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.yaml").write_text(textwrap.dedent(config))
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "micro_arch", "trace", str(folder), "--set", "model.vocab_size=50",
             "--batch", "1", "--seq-len", "8"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_config_errors_briefly(cli_results, case):
    code, out, err = cli_results[case]
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("error: ")
    assert len(err.splitlines()) <= 4, err
    for word in CLI_CASES[case][1]:
        assert word in err, (word, err)


def test_cli_spec_error_keeps_the_caret_under_the_name(cli_results):
    _, _, err = cli_results["bad_spec"]
    lines = err.splitlines()
    assert lines[1].strip() == "Norm->Atn->+->Norm->MLP->+"
    assert lines[2].index("^") == lines[1].index("Atn")


# --- where an error is reported: the file's line, the override, the layer and branch --------------

def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(textwrap.dedent(text))
    return folder


def error_of(fn, *args) -> str:
    with pytest.raises(MicroArchError) as info:
        fn(*args)
    return str(info.value)


def test_yaml_error_keeps_line_and_column_and_shows_the_line(tmp_path):
    folder = write_config(tmp_path / "e", """\
        model:
          d_model: 64
          layers: [{spec: 'Norm->Attn->+', repeat: 2}
        train:
          max_steps: 3
        """)
    message = error_of(load_config, folder)
    first, shown, caret = message.splitlines()[:3]
    assert f"{folder / 'config.yaml'}:4:1: not valid YAML" in first, first
    assert "line 3" in first  # where the unclosed '[' began
    assert shown.strip() == "train:"
    assert caret.index("^") == shown.index("train")


def test_yaml_error_in_a_sweep_file_keeps_its_position(tmp_path):
    from micro_arch.config import read_yaml

    path = tmp_path / "s.yaml"
    path.write_text("experiment: x\nsearch_space:\n  model.d_model: {type: int, low: 1\n")
    message = error_of(read_yaml, path)
    assert f"{path}:4:1" in message.splitlines()[0] or f"{path}:3:" in message.splitlines()[0], message
    assert "^" in message


@pytest.mark.parametrize("override,words", [
    ("model.d_model=abc", ["model.d_model", "'abc' should be int"]),
    ("model.d_modl=64", ["unknown key 'd_modl'", "did you mean: d_model"]),
    ("model.layers.0.spec=Norm->Atn->+", ["unknown block 'Atn'"]),
    ("train.max_steps=0", ["max_steps", "at least 1"]),
])
def test_errors_in_set_values_name_the_override_not_the_file(tmp_path, capsys, override, words):
    from micro_arch.cli import main

    folder = write_config(tmp_path / "e", "model: {d_model: 64}\n")
    with pytest.raises(SystemExit) as info:
        main(["trace", str(folder), "--set", "model.vocab_size=50", override, "--batch", "1", "--seq-len", "8"])
    message = capsys.readouterr().err
    assert info.value.code == 2 and message.startswith(f"error: --set {override}: "), message
    assert "config.yaml" not in message
    for word in words:
        assert word in message, (word, message)


def test_an_error_in_the_file_is_still_reported_against_the_file(tmp_path):
    folder = write_config(tmp_path / "e", "model: {d_model: wide}\n")
    message = error_of(load_config, folder, ["train.lr=0.01"])
    assert message.startswith(str(folder / "config.yaml")) and "'wide' should be int" in message


def test_empty_spec_given_with_set_says_what_a_spec_looks_like(tmp_path):
    folder = write_config(tmp_path / "e", "model: {d_model: 64}\n")
    message = error_of(load_config, folder, ["model.layers.0.spec="])
    assert message.startswith("--set model.layers.0.spec=: "), message
    assert "None should be" not in message and "empty" in message
    assert "'Norm->Attn->+->Norm->MLP->+'" in message and "list" in message


def test_empty_spec_in_the_file_says_what_a_spec_looks_like(tmp_path):
    folder = write_config(tmp_path / "e", "model:\n  layers: [{spec: , repeat: 2}]\n")
    message = error_of(load_config, folder)
    assert "model.layers[0].spec" in message and "empty" in message and "'Norm->Attn->+->Norm->MLP->+'" in message


def test_empty_config_warns_that_every_default_is_used(tmp_path, capsys):
    folder = write_config(tmp_path / "e", "# nothing yet\n")
    cfg = load_config(folder)
    err = capsys.readouterr().err
    assert "warning" in err and "empty" in err and "every default" in err
    assert f"{cfg.train.max_steps} steps" in err
    load_config(write_config(tmp_path / "f", ""), ["train.max_steps=7"])
    assert "7 steps" in capsys.readouterr().err
    load_config(write_config(tmp_path / "g", "train: {max_steps: 5}\n"))
    assert "warning" not in capsys.readouterr().err


def test_empty_argument_value_is_an_error_with_a_caret():
    text = "Norm->Attn(n_kv_heads=)->+"
    lines = error_of(parse_chain, text).splitlines()
    assert "n_kv_heads" in lines[0] and "empty" in lines[0] and "null" in lines[0]
    assert lines[1] == "    " + text
    assert lines[2].index("^") == lines[1].index("=)") + 1


def test_null_argument_value_still_means_none():
    (_, attn, _) = parse_chain("Norm->Attn(n_kv_heads=null)->+")
    assert attn.kwargs == {"n_kv_heads": None}


def test_empty_branch_names_its_index(tmp_path):
    folder = write_config(tmp_path / "e", "model:\n  layers: [{spec: ['Norm->Attn->+', 'Norm->MLP->+', ' ']}]\n")
    message = error_of(load_experiment_model, folder, [])
    assert message.startswith(f"{folder / 'config.yaml'}: model.layers[0].spec[2]: bad block string: empty"), message


def test_block_argument_rejected_by_the_block_points_at_the_layer_and_argument(tmp_path):
    folder = write_config(tmp_path / "e", """\
        model:
          n_heads: 4
          layers:
            - {spec: 'Norm->MLP->+', repeat: 1}
            - {spec: ['Norm->MLP->+', 'Norm->Attn(window=8, n_kv_heads=3)->+'], repeat: 2}
        """)
    lines = error_of(load_experiment_model, folder, []).splitlines()
    assert lines[0].startswith(f"{folder / 'config.yaml'}: model.layers[1].spec[1]: "), lines[0]
    assert "n_kv_heads=3" in lines[0] and "multiple" in lines[0]
    text = "Norm->Attn(window=8, n_kv_heads=3)->+"
    assert lines[1] == "    " + text
    assert lines[2].index("^") == lines[1].index("n_kv_heads")


def load_experiment_model(folder, overrides):
    from micro_arch.experiment import build_model, load_experiment

    return build_model(load_experiment(folder, ["model.vocab_size=50", *overrides]))


@pytest.mark.parametrize("override", ["=5", "model..d_model=3", "model.=3", " .x=1"])
def test_override_keys_with_empty_parts_are_refused(tmp_path, override):
    folder = write_config(tmp_path / "e", "model: {d_model: 64}\n")
    message = error_of(load_config, folder, [override])
    assert f"override {override!r}: the key" in message and "empty part" in message


@pytest.mark.parametrize("override, words", [
    ("model.d_ff=0", ["model.d_ff", "at least 1"]),
    ("model.head_dim=0", ["model.head_dim", "at least 1"]),
    ("model.vocab_size=0", ["model.vocab_size", "at least 1"]),
    ("model.rope_theta=0", ["model.rope_theta", "positive"]),
    ("model.init_std=-1", ["model.init_std", ">= 0"]),
    ("train.max_tokens=0", ["train.max_tokens", "at least 1"]),
    ("train.grad_clip=0", ["train.grad_clip", "positive", "null"]),
    ("train.min_lr=-1", ["train.min_lr", ">= 0"]),
    ("train.betas=[2, 0.9]", ["train.betas", "[0, 1)"]),
    ("train.weight_decay=-1", ["train.weight_decay", ">= 0"]),
    ("train.eps=0", ["train.eps", "positive"]),
    ("train.sample.temperature=-1", ["train.sample.temperature", ">= 0"]),
    ("train.sample.top_p=2", ["train.sample.top_p", "(0, 1]"]),
    ("train.sample.top_k=0", ["train.sample.top_k", "at least 1"]),
    ("train.sample.max_new_tokens=-1", ["train.sample.max_new_tokens", ">= 0"]),
])
def test_numbers_that_would_fail_later_are_refused_with_the_config(tmp_path, override, words):
    """Values that torch would reject deep inside (or the sampler after all the training) fail at once."""
    folder = write_config(tmp_path / "e", "model: {d_model: 64}\n")
    message = error_of(load_config, folder, [override])
    assert message.startswith(f"--set {override}: "), message
    for word in words:
        assert word in message, (word, message)


def test_a_key_given_twice_in_a_file_is_an_error_with_both_lines(tmp_path):
    folder = write_config(tmp_path / "e", "model:\n  d_model: 64\n  n_heads: 2\n  d_model: 128\n")
    lines = error_of(load_config, folder).splitlines()
    assert f"{folder / 'config.yaml'}:4:3: not valid YAML: key 'd_model' appears twice (first at line 2)" in lines[0]
    assert lines[1].strip() == "d_model: 128" and lines[2].index("^") == lines[1].index("d_model")
