"""The built-in blocks, one file per family; importing this package registers them all.

Installed as `micro_arch.blocks` (pyproject's package-dir), so no top-level `blocks` lands on a user's path.
"""

from micro_arch.blocks import attention, mlp, norms  # noqa: F401

for _optional in ("moe", "mamba", "rmsnorm_triton"):
    try:
        __import__(f"micro_arch.blocks.{_optional}")
    except ModuleNotFoundError as _err:
        if _err.name != f"micro_arch.blocks.{_optional}":
            raise
