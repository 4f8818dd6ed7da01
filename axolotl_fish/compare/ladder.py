"""The learning-rate ladder and the rule that picks a learning rate on validation.

The ladder is 1, 3, 10, 30, ... times a power of ten. A grid starts at a few of its values; the
best validation value wins (ties: the lower LR), and while the best sits at an edge of the grid
and beats its neighbour, one more ladder step past that edge is tried.
"""

from __future__ import annotations

import math

LADDER_MANTISSAS = (1.0, 3.0)


def ladder_step(lr: float, up: bool) -> float:
    """The next value on the 1, 3, 10, 30, ... ladder above or below lr."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    values = sorted(
        m * 10.0**e for e in range(exponent - 2, exponent + 3) for m in LADDER_MANTISSAS
    )
    values = [float(f"{v:.3g}") for v in values]
    return (
        next(v for v in values if v > lr * 1.01) if up else [v for v in values if v < lr * 0.99][-1]
    )


def ladder_around(lr: float) -> list[float]:
    """The starting grid for a config's learning rate: one ladder step below it, it, one above."""
    return [ladder_step(lr, up=False), lr, ladder_step(lr, up=True)]


def choose_lr(grid: dict[float, float]) -> tuple[float, float | None]:
    """(best LR, LR still to try or None): the best validation value, higher is better (ties:
    lower LR); while it sits at an edge of the grid and beats its neighbour, one ladder step past
    that edge."""
    lrs = sorted(grid)
    best = max(lrs, key=lambda lr: (grid[lr], -lr))
    if len(lrs) > 1 and best == lrs[0] and grid[best] > grid[lrs[1]]:
        return best, ladder_step(best, up=False)
    if len(lrs) > 1 and best == lrs[-1] and grid[best] > grid[lrs[-2]]:
        return best, ladder_step(best, up=True)
    return best, None


def lrs_to_run(
    grid: dict[float, float], start: list[float], bounds: tuple[float, float]
) -> list[float]:
    """The grid's LRs still to run: every missing starting LR, then (once those are in) one
    ladder step past an edge while `choose_lr` asks for one inside `bounds`. Empty: done."""
    missing = [lr for lr in start if lr not in grid]
    if missing:
        return missing
    _, more = choose_lr(grid)
    return [more] if more is not None and bounds[0] <= more <= bounds[1] else []
