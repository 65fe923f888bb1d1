"""The built-in blocks, one file per family; importing this package registers them all."""

from blocks import attention, mlp, norms  # noqa: F401

for _optional in ("moe", "mamba", "rmsnorm_triton"):
    try:
        __import__(f"blocks.{_optional}")
    except ModuleNotFoundError as _err:
        if _err.name != f"blocks.{_optional}":
            raise
