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
