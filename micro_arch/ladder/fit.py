"""Loss against compute, L(C) = E + A·C^(−α), fitted with intervals from a bootstrap over the ladder's points.

The fit: for a fixed α the law is linear in (E, A), so least squares over (E, A) has a closed form and only
α is searched (a profile fit, on a fine grid of α refined by a parabola through the best three). E is kept
at or above 0 and A above 0 (loss falls with compute toward a floor). The same fit runs on many bootstrap
replicates at once, as arrays, which keeps a bootstrap of thousands of fits to a fraction of a second.

The intervals: every point (budget x seed) keeps its fitted value plus a residual drawn again from all the
fit's residuals (rescaled by sqrt(n / (n − 3)) for the three fitted parameters); each parameter's interval
is its estimate ± t(0.975, n − 3) bootstrap standard errors, which keeps its coverage near 95% with the few
points a ladder has. The intervals hold if the law is the right shape; far extrapolation adds the risk
that it is not (the honesty check measures that: ladder/report.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHAS = np.geomspace(0.005, 3.0, 1200)  # the grid α is searched on
LEVEL = 0.95


@dataclass
class PowerLaw:
    E: float
    A: float  # for C in FLOPs
    alpha: float

    def __call__(self, C):
        return self.E + self.A * np.asarray(C, dtype=float) ** -self.alpha


def _solve(x: np.ndarray, Y: np.ndarray, floor: bool):
    """For each α column of x [n, G] and each replicate row of Y [B, n]: (E, A, sse), each [B, G], of the
    least-squares line Y ≈ E + A x with E >= 0 (E = 0 when floor is False)."""
    n = x.shape[0]
    sx, sxx = x.sum(0), (x * x).sum(0)  # [G]
    sy, syy = Y.sum(1, keepdims=True), (Y * Y).sum(1, keepdims=True)  # [B, 1]
    sxy = Y @ x  # [B, G]
    # through the origin (E = 0)
    A0 = sxy / sxx
    sse0 = syy - sxy * A0
    if not floor:
        return np.zeros_like(A0), A0, np.where(A0 > 0, sse0, np.inf)
    vxx = sxx - sx * sx / n
    cxy = sxy - sy * sx / n
    A = cxy / vxx
    E = (sy - A * sx) / n
    sse = syy - sy * sy / n - cxy * A
    free = E >= 0
    E, A, sse = np.where(free, E, 0.0), np.where(free, A, A0), np.where(free, sse, sse0)
    return E, A, np.where(A > 0, sse, np.inf)


def fit_many(C, Y, floor: bool = True):
    """The fits of Y [B, n] (or [n]) against compute C [n]: arrays E, A, alpha of shape [B]."""
    C = np.asarray(C, dtype=float)
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    scale = math.exp(np.log(C).mean())  # fit in C / its geometric mean: x stays near 1, well conditioned
    logc = np.log(C / scale)

    def at(alphas):
        return _solve(np.exp(-np.outer(logc, alphas)), Y, floor)

    _, _, sse = at(ALPHAS)
    best = np.clip(np.argmin(sse, axis=1), 1, len(ALPHAS) - 2)
    # a parabola in log α through the best grid point and its neighbours
    la = np.log(ALPHAS)
    rows = np.arange(len(Y))
    s0, s1, s2 = sse[rows, best - 1], sse[rows, best], sse[rows, best + 1]
    h = la[1] - la[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = 0.5 * h * (s0 - s2) / (s0 - 2 * s1 + s2)
    shift = np.where(np.isfinite(shift) & (np.abs(shift) <= h), shift, 0.0)
    alpha = np.exp(la[best] + shift)
    E, A, _ = _solve(np.exp(-logc[:, None] * alpha[None, :]), Y, floor)
    E, A = E[rows, rows], A[rows, rows]
    none = ~np.isfinite(sse.min(axis=1))  # the loss does not fall with compute: no law of this shape
    return (np.where(none, np.nan, E), np.where(none, np.nan, A * scale ** alpha), np.where(none, np.nan, alpha))


def fit_power_law(C, L, floor: bool = True) -> PowerLaw:
    E, A, alpha = fit_many(C, L, floor)
    return PowerLaw(float(E[0]), float(A[0]), float(alpha[0]))


@dataclass
class LadderFit:
    """One architecture's law with its bootstrap: intervals for E and α, bands and predictions."""
    C: np.ndarray  # the points' compute
    L: np.ndarray  # their held-out loss
    law: PowerLaw
    boot: dict = field(default_factory=dict)  # "E", "A", "alpha": arrays over the replicates
    df: int = 0  # points minus fitted parameters

    @property
    def t(self) -> float:
        from micro_arch.report.seed_stats import need_scipy

        return float(need_scipy("the ladder's intervals").t.ppf(1 - (1 - LEVEL) / 2, self.df)) if self.df else math.inf

    def interval(self, name: str) -> tuple[float, float]:
        value = getattr(self.law, name)
        half = self.t * float(np.std(self.boot[name], ddof=1)) if len(self.boot.get(name, [])) > 1 else math.inf
        return value - half, value + half

    def predict(self, C) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss, low, high) at compute C: the law and its 95% band."""
        C = np.atleast_1d(np.asarray(C, dtype=float))
        mid = self.law(C)
        reps = self.boot["E"][:, None] + self.boot["A"][:, None] * C[None, :] ** -self.boot["alpha"][:, None]
        half = self.t * reps.std(0, ddof=1)
        return mid, mid - half, mid + half


def fit_with_bootstrap(C, L, n_boot: int = 1000, seed: int = 0, floor: bool = True) -> LadderFit:
    """The fit of L against C, and n_boot refits on residuals drawn again (see the module's docstring)."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    law = fit_power_law(C, L, floor)
    if not math.isfinite(law.alpha):
        from micro_arch.errors import MicroArchError

        raise MicroArchError("the held-out loss does not fall with compute at these points, so no law "
                             "E + A·C^(−α) fits them; check the runs (a diverged or mis-sized point?)")
    n, p = len(L), 3 if floor else 2
    df = n - p
    fit = LadderFit(C, L, law, df=max(df, 0))
    if df <= 0:
        return fit  # as many parameters as points: no residuals, no intervals
    residuals = (L - law(C)) * math.sqrt(n / df)
    residuals -= residuals.mean()
    rng = np.random.default_rng(seed)
    Y = law(C)[None, :] + residuals[rng.integers(0, n, size=(n_boot, n))]
    E, A, alpha = fit_many(C, Y, floor)
    keep = np.isfinite(alpha)  # a replicate whose loss rises with compute has no law: left out
    fit.boot = {"E": E[keep], "A": A[keep], "alpha": alpha[keep]}
    return fit


def crossings(a: PowerLaw, b: PowerLaw, low: float, high: float) -> list[float]:
    """The compute values in [low, high] where the two laws give the same loss."""
    from scipy.optimize import brentq

    grid = np.geomspace(low, high, 400)
    gap = a(grid) - b(grid)
    found = []
    for i in np.nonzero(np.sign(gap[:-1]) * np.sign(gap[1:]) < 0)[0]:
        found.append(float(np.exp(brentq(lambda lc: float(a(np.exp(lc)) - b(np.exp(lc))),
                                          math.log(grid[i]), math.log(grid[i + 1])))))
    return found
