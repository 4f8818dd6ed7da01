"""Paired bootstrap intervals for accuracy differences, and the words a claim may use.

Two methods are compared on the same test rows and the same seeds (a seed fixes the adapter's
initialisation and the data order, so seed s of one method is paired with seed s of the other).
The difference is mean over seeds of (accuracy A - accuracy B). Its 95% interval comes from a
two-level paired bootstrap: draw the seeds with replacement, then the test rows with replacement,
the same draws for both methods, so the interval carries both seed-to-seed and test-sampling
noise. With one seed only the rows are drawn (and the claim says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SEEDS_FOR_CLAIM = 3


@dataclass(frozen=True)
class Difference:
    mean: float
    low: float
    high: float
    seeds: int

    def claim(self, a: str, b: str, margin: float) -> str:
        """What the interval allows one to say about A against B."""
        if self.seeds < MIN_SEEDS_FOR_CLAIM:
            return f"no claim yet ({self.seeds} of {MIN_SEEDS_FOR_CLAIM} seeds)"
        if self.low > 0:
            return f"{a} beats {b}"
        if self.high < 0:
            return f"{a} is worse than {b}"
        if -margin <= self.low and self.high <= margin:
            points = 100 * margin
            return f"{a} matches {b} within {points:g} point{'' if points == 1 else 's'}"
        return "no difference shown (interval spans 0)"

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 4000, seed: int = 0) -> Difference:
    """a, b: [seeds, rows] 0/1 correctness of two methods on the same rows, seeds in the same
    order. Returns the mean difference and its 95% percentile interval."""
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
    return Difference(float(diff.mean()), float(low), float(high), seeds)
