"""Deprecated import path, kept so that experiments' blocks.py files written for it keep working:
use `micro_arch.model.state`."""

import warnings

from micro_arch.model.state import *  # noqa: F401, F403

warnings.warn("micro_arch.model.state is deprecated; import from micro_arch.model.state instead", FutureWarning, stacklevel=2)
