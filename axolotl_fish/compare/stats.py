"""Paired bootstrap intervals for metric differences, and the words a claim may use.

Two methods are compared on the same test rows and the same seeds (a seed fixes the adapter's
initialisation and the data order, so seed s of one method is paired with seed s of the other).
The difference is mean over seeds of (value A - value B), per-row values oriented so that higher
is better (0/1 correctness; a loss enters negated). Its 95% interval comes from a
two-level paired bootstrap: draw the seeds with replacement, then the test rows with replacement,
the same draws for both methods, so the interval carries both seed-to-seed and test-sampling
noise. With one seed only the rows are drawn (and the claim says so).

With 3 seeds the seed level of that bootstrap can only draw 10 different sets of seeds, and its
interval comes out narrower than the seed-to-seed spread warrants. So a claim also needs the
Student-t 95% interval over the per-seed differences (the seed as the unit, n - 1 degrees of
freedom) to allow it: the stricter of the two decides.

Needs numpy and scipy only (the benchmark scripts import it as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

MIN_SEEDS_FOR_CLAIM = 3


@dataclass(frozen=True)
class Difference:
    mean: float
    low: float  # paired bootstrap
    high: float
    seeds: int
    t_low: float  # Student t over the per-seed differences (nan with one seed)
    t_high: float

    @property
    def beats(self) -> bool:
        """A above B: both intervals lie above 0."""
        return min(self.low, self.t_low) > 0

    @property
    def worse(self) -> bool:
        """A below B: both intervals lie below 0."""
        return max(self.high, self.t_high) < 0

    def complete(self, planned: int) -> bool:
        """Every planned seed (at least MIN_SEEDS_FOR_CLAIM) is in."""
        return self.seeds >= max(planned, MIN_SEEDS_FOR_CLAIM)

    def claim(
        self,
        a: str,
        b: str,
        margin: float,
        planned: int = MIN_SEEDS_FOR_CLAIM,
        unit: str = "point",
        scale: float = 100.0,
    ) -> str:
        """What both intervals allow one to say about A against B, once every planned seed
        (at least MIN_SEEDS_FOR_CLAIM) is in: no claim is read off a partial set of seeds.
        `margin` is in the metric's own units; "matches" is written as scale * margin `unit`s
        (accuracy: points of 100; a loss: nats, scale 1)."""
        if not self.complete(planned):
            return f"no claim yet ({self.seeds} of {max(planned, MIN_SEEDS_FOR_CLAIM)} seeds)"
        if self.beats:
            return f"{a} beats {b}"
        if self.worse:
            return f"{a} is worse than {b}"
        low, high = min(self.low, self.t_low), max(self.high, self.t_high)
        if -margin <= low and high <= margin:
            amount = scale * margin
            return f"{a} matches {b} within {amount:g} {unit}{'' if amount == 1 else 's'}"
        intervals = {"bootstrap": (self.low, self.high), "t": (self.t_low, self.t_high)}
        spanning = [name for name, (lo, hi) in intervals.items() if lo <= 0 <= hi]
        return f"no difference shown ({' and '.join(spanning)} interval(s) span 0)"

    def __str__(self) -> str:
        return self.format(100.0, ".1f")

    def format(self, scale: float, spec: str) -> str:
        """`mean [bootstrap], t [t interval]`, each value times `scale` in format `spec`."""

        def value(x: float) -> str:
            return f"{scale * x:+{spec}}"

        text = f"{value(self.mean)} [{value(self.low)}, {value(self.high)}]"
        if self.seeds > 1:
            text += f", t [{value(self.t_low)}, {value(self.t_high)}]"
        return text


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 4000, seed: int = 0) -> Difference:
    """a, b: [seeds, rows] per-row values of two methods on the same rows (0/1 correctness, or a
    negated loss), seeds in the same order. Returns the mean difference and its 95% percentile
    interval."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"paired arrays must have the same [seeds, rows] shape: {a.shape}, {b.shape}"
        )
    diff = a.astype(np.float64) - b.astype(np.float64)
    seeds, rows = diff.shape
    rng = np.random.default_rng(seed)
    seed_draw = (
        rng.integers(0, seeds, size=(draws, seeds)) if seeds > 1 else np.zeros((draws, 1), int)
    )
    row_draw = rng.integers(0, rows, size=(draws, rows))
    # per_seed[d, s]: mean over the drawn rows of seed s's difference, in one pass per seed.
    per_seed = np.stack([diff[s][row_draw].mean(axis=1) for s in range(seeds)], axis=1)
    stats = np.take_along_axis(per_seed, seed_draw, axis=1).mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    t_low, t_high = seed_t_interval(diff.mean(axis=1))
    return Difference(float(diff.mean()), float(low), float(high), seeds, t_low, t_high)


def seed_t_interval(per_seed: np.ndarray) -> tuple[float, float]:
    """Student-t 95% interval of the mean of the per-seed differences (nan with one seed)."""
    n = len(per_seed)
    if n < 2:
        return float("nan"), float("nan")
    half = student_t.ppf(0.975, n - 1) * per_seed.std(ddof=1) / np.sqrt(n)
    return float(per_seed.mean() - half), float(per_seed.mean() + half)
