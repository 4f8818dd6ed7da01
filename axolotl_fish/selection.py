"""Exactly k entries, chosen by one global ranking over all adapter tensors.

Ties are common (every lora_A score is exactly 0 while lora_B is 0 at initialisation), so they
are broken by a seeded random draw: never by position (a bias toward the first layers) and never
by a `score >= threshold` rule (which silently keeps every tied entry, i.e. more than k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TieBreak:
    """How much of the selection was decided by a random draw among equal scores."""

    score: float
    tied: int
    chosen: int


@dataclass
class Selection:
    """Boolean masks (True = trainable), keyed like the scores, and any tie that was broken."""

    masks: dict[str, torch.Tensor]
    tie_break: TieBreak | None


def budget(keep_ratio: float, total: int) -> int:
    """k = round(keep_ratio * total), refusing budgets that select nothing."""
    k = round(keep_ratio * total)
    if k < 1:
        raise ValueError(
            f"keep_ratio={keep_ratio} of {total} entries selects no entry; raise keep_ratio."
        )
    return k


def select_top_k(scores: dict[str, torch.Tensor], k: int, seed: int) -> Selection:
    """Keep the k highest-scoring entries over all tensors together (the paper's global top-k).

    Runs on CPU in O(total): the k-th largest score is found with `kthvalue`, every entry above it
    is kept, and the remaining places go to a seeded random subset of the entries equal to it.
    """
    for key, score in scores.items():
        if not torch.isfinite(score).all():
            raise ValueError(f"Importance scores of tensor {key!r} contain NaN or Inf.")
    flat = torch.cat([s.detach().float().cpu().flatten() for s in scores.values()])
    total = flat.numel()
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the number of entries ({total}).")
    threshold = torch.kthvalue(flat, total - k + 1).values
    keep = flat > threshold
    tied = (flat == threshold).nonzero()[:, 0]
    needed = k - int(keep.sum())
    generator = torch.Generator().manual_seed(seed)
    keep[tied[torch.randperm(tied.numel(), generator=generator)[:needed]]] = True
    tie_break = None
    if needed < tied.numel():
        tie_break = TieBreak(score=float(threshold), tied=tied.numel(), chosen=needed)
    masks = {}
    offset = 0
    for key, score in scores.items():
        masks[key] = keep[offset : offset + score.numel()].view(score.shape).clone()
        offset += score.numel()
    return Selection(masks=masks, tie_break=tie_break)
