"""The scorer hook: what a scorer receives, what it returns, and the pluggy markers.

A scorer ranks adapter entries; the core then keeps exactly the k highest scores (ties broken
by a seeded draw), so a scorer never decides k or breaks ties itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy
import torch
from torch import nn

if TYPE_CHECKING:
    from axolotl_fish.config import FishMaskConfig

PROJECT = "axolotl_fish"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass
class ScoringContext:
    """Everything a scorer may read. `params` are keyed like the saved adapter; `batches` are
    the trainer's own training micro-batches (read lazily: only as many as the scorer needs)."""

    model: nn.Module
    batches: Iterable[Mapping[str, torch.Tensor]]
    params: Mapping[str, nn.Parameter]
    config: FishMaskConfig
    progress: bool = True


@dataclass
class Scores:
    """One score tensor per entry of `params` (same keys and shapes; higher = keep), plus
    JSON-serialisable facts for the mask file's metadata."""

    scores: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[ScoringContext], Scores]


class ScorerSpec:
    """Hook specifications of the `axolotl_fish` pluggy project."""

    @hookspec
    def fish_mask_scorers(self) -> Mapping[str, Scorer]:
        """Return the scorers this plugin provides, by the name `fish_mask.strategy` uses.

        Scores must be the same on every rank under torch.distributed (seed any randomness from
        `config.seed`); the run checks that every rank ends with the same mask.
        """
