"""No network from transformers or the hub client: every Hugging Face read is of a local folder."""

from __future__ import annotations

import os

from micro_arch.errors import MicroArchError


def offline() -> None:
    """No network from transformers or the hub client, whatever the environment says; and a clear error
    when transformers is not installed."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported; local_files_only does the rest
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MicroArchError("Hugging Face export and import need transformers: pip install -e '.[hf]'") from None
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass
