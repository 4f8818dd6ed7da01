"""Pluggable importance scorers (pluggy project `axolotl_fish`).

`fish_mask.strategy` names a scorer. Built-in: `fisher`, `random`, `reverse`; more come from
installed packages through the `axolotl_fish.scorers` entry-point group. See docs/scorers.md.

Floor 3: may import `base`, `config`, `fisher`; never Axolotl.
"""

from axolotl_fish.scorers.registry import (
    ENTRY_POINT_GROUP,
    available_scorers,
    check_strategy,
    score,
)
from axolotl_fish.scorers.spec import Scorer, Scores, ScoringContext, hookimpl

__all__ = [
    "ENTRY_POINT_GROUP",
    "Scorer",
    "Scores",
    "ScoringContext",
    "available_scorers",
    "check_strategy",
    "hookimpl",
    "score",
]
