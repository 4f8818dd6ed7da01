"""Exactly k entries, chosen by one ranking over all adapter tensors or within budget groups.

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


def select_in_groups(
    scores: dict[str, torch.Tensor], k: int, seed: int, groups: list[list[str]]
) -> tuple[dict[str, torch.Tensor], list[TieBreak]]:
    """Split k over groups of tensors in proportion to their sizes (largest remainder, so the
    parts add up to exactly k), then keep the top entries within each group."""
    sizes = [sum(scores[key].numel() for key in group) for group in groups]
    shares = apportion(k, sizes)
    masks: dict[str, torch.Tensor] = {}
    ties = []
    for index, (group, share) in enumerate(zip(groups, shares, strict=True)):
        if share == 0:
            masks |= {key: torch.zeros_like(scores[key], dtype=torch.bool) for key in group}
            continue
        selection = select_top_k({key: scores[key] for key in group}, share, seed + index)
        masks |= selection.masks
        if selection.tie_break is not None:
            ties.append(selection.tie_break)
    return {key: masks[key] for key in scores}, ties


def apportion(k: int, sizes: list[int]) -> list[int]:
    """Integer shares of k proportional to sizes, summing to exactly k (largest remainder)."""
    total = sum(sizes)
    exact = [k * size / total for size in sizes]
    shares = [int(value) for value in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: k - sum(shares)]:
        shares[i] += 1
    return shares


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
