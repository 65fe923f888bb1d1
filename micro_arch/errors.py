"""One exception type for everything a user can get wrong: the CLI prints its message, never a traceback."""

import difflib


class MicroArchError(Exception):
    """A user-facing error: the message says what was wrong, where, and what would be right.

    `where`, when given, is the config key the message is about (e.g. 'model.layers[0].spec[1]'), so that
    an error caused by a `--set` override can be reported against that override (config.blame_override).
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where


def closest(name: str, candidates, n: int = 3) -> str:
    """' (did you mean: a, b?)' for the nearest candidates, or '' when none is near."""
    lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(lower[f] for f in found)}?)" if found else ""
