"""One exception type for everything a user can get wrong: the CLI prints its message, never a traceback."""

import copy
import difflib

_KEEP = object()


class MicroArchError(Exception):
    """A user-facing error: the message says what was wrong, where, and what would be right.

    `where`, when given, is the config key the message is about (e.g. 'model.layers[0].spec[1]'), or a tuple of
    the keys when a rule ties several together (d_model and n_heads), so that an error caused by a `--set`
    override or by one file of an `extends` chain is reported against it (config.blame). `where` is the first
    key, `places` all of them.
    """

    def __init__(self, message: str, where: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.places: tuple[str, ...] = (where,) if isinstance(where, str) else tuple(where or ())
        self.where = self.places[0] if self.places else None

    def reworded(self, message: str, where=_KEEP) -> "MicroArchError":
        """The same error (its class and fields: a BlockArgumentError keeps its block and argument) with a new
        message, and new keys when `where` is given: for a caller that adds where the error happened."""
        new = copy.copy(self)
        new.args = (message,)
        if where is not _KEEP:
            new.places = (where,) if isinstance(where, str) else tuple(where or ())
            new.where = new.places[0] if new.places else None
        return new


class BlockArgumentError(MicroArchError, ValueError):
    """A block refuses one of its arguments. `argument` names it and `block` is the registered name (the registry
    fills it in when a block's constructor raises this without it), so that a caller can point at the argument
    in a block string without reading the message. A ValueError too: a block's constructor raises it, and code
    that builds the class directly catches a ValueError."""

    def __init__(self, message: str, argument: str | None = None, block: str | None = None,
                 where: str | tuple[str, ...] | None = None):
        super().__init__(message, where)
        self.argument, self.block = argument, block


def closest(name: str, candidates, n: int = 3) -> str:
    """' (did you mean: a, b?)' for the nearest candidates, or '' when none is near."""
    lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(lower[f] for f in found)}?)" if found else ""
