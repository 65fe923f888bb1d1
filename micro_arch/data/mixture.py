"""Mixtures by token share: a view over the sources' training tokens, nothing copied.

Source i gives weights[i]/sum(weights) of the training tokens: its stream is cut to that many tokens (a
source with more text than its share), or repeated from its start (one with less), and the sources follow
one another with the separator between. Random windows over the view then draw each source at its share.
The mixture is as long as all sources' training tokens together.
"""

from __future__ import annotations

import numpy as np

from .shards import join_streams


def mixture(trains: list, weights: list[float], separator: np.ndarray):
    """Each source's training tokens cut (or repeated) to weights[i]/sum(weights) of all of them, one after
    another with the separator between: random windows over it then draw each source at its share."""
    total = sum(len(t) for t in trains)
    segments = []
    for train, weight in zip(trains, weights):
        quota = round(total * weight / sum(weights))
        while quota > 0:
            take = min(quota, len(train))
            segments.append(train[:take] if isinstance(train, np.ndarray) else train.slice(0, take))
            quota -= take
    return join_streams(segments, separator)
