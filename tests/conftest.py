import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One token cache for the whole test session, away from the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MICRO_ARCH_CACHE"] = str(path)
    return path
