import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One token cache for the whole test session, away from the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MICRO_ARCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    there one thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_experiment(tmp_path):
    """A factory of tiny experiment folders (tests/helpers.py's TINY unless another config text is given):
    `exp = tiny_experiment()`, `tiny_experiment(text, name="other")`."""
    from helpers import TINY, make_experiment

    return lambda text=TINY, name="tiny": make_experiment(tmp_path, text, name)


@pytest.fixture
def tok():
    """A character tokenizer with the chat template (tests of the later stages)."""
    from stage_helpers import TEXT

    from micro_arch.data import CharTokenizer
    from micro_arch.data.chat_template import ChatTokenizer

    return ChatTokenizer(CharTokenizer(TEXT))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny pretrain run, and SFT/DPO experiments (with their data) that start from it (once per test module)."""
    from stage_helpers import PRETRAIN, STAGE, write_jsonl

    from micro_arch.commands.run import run_experiment
    from micro_arch.data.corpus import read_works
    from micro_arch.stages.dialogues import exchanges, preference_pairs

    root = tmp_path_factory.mktemp("chain")
    items = [e for w in read_works()[3:5] for e in exchanges([w], max_user_chars=60, max_answer_chars=50)[:30]]
    for name, rows in (("sft", [{"messages": e.messages()} for e in items]), ("dpo", preference_pairs(items, 0))):
        write_jsonl(root / f"{name}_train.jsonl", rows[:48])
        write_jsonl(root / f"{name}_val.jsonl", rows[48:])
    for name, text in (("pretrain", PRETRAIN), *((s, STAGE.format(stage=s, train=root / f"{s}_train.jsonl",
                                                                  val=root / f"{s}_val.jsonl")) for s in ("sft", "dpo"))):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(text)
    parent = run_experiment(root / "pretrain", runs_root=root / "runs")
    return root, parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A data cache of the test's own ($MICRO_ARCH_CACHE), for tests that look at what preparation writes."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MICRO_ARCH_CACHE", str(path))
    return path
