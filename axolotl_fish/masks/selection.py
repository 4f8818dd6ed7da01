"""Exactly k entries, chosen by one ranking over all adapter tensors or within budget groups.

Ties are common (every lora_A score is exactly 0 while lora_B is 0 at initialisation), so they
are broken by a seeded random draw: never by position (a bias toward the first layers) and never
by a `score >= threshold` rule (which silently keeps every tied entry, i.e. more than k).
"""

from __future__ import annotations

from collections.abc import Callable
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

    Never concatenates the scores: the k-th largest score is found by a two-pass radix select
    over per-tensor histograms of the scores' bits (working memory about one tensor), every entry
    above it is kept, and the remaining places go to a seeded random subset of the entries equal
    to it, drawn over the tied entries in tensor order then position order.
    """
    for key, score in scores.items():
        if not torch.isfinite(score).all():
            raise ValueError(f"Importance scores of tensor {key!r} contain NaN or Inf.")
    total = sum(score.numel() for score in scores.values())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the number of entries ({total}).")
    high, above = _kth_bin(scores, k, lambda keys: (keys >> _HALF) + (1 << (_HALF - 1)), None)
    low, above = _kth_bin(scores, k - above, lambda keys: keys & _LOW_MASK, high)
    threshold = ((high - (1 << (_HALF - 1))) << _HALF) | low
    keep: dict[str, torch.Tensor] = {}
    tied_at: list[torch.Tensor] = []  # flat positions of the entries equal to the threshold
    for key, score in scores.items():
        ordered = _ordered(score)
        keep[key] = (ordered > threshold).cpu()
        tied_at.append((ordered == threshold).flatten().nonzero()[:, 0].cpu())
    tied = sum(positions.numel() for positions in tied_at)
    needed = k - sum(int(mask.sum()) for mask in keep.values())
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(tied, generator=generator)[:needed]
    offset = 0
    for mask, positions in zip(keep.values(), tied_at, strict=True):
        mine = chosen[(chosen >= offset) & (chosen < offset + positions.numel())] - offset
        mask.view(-1)[positions[mine]] = True
        offset += positions.numel()
    tie_break = None
    if needed < tied:
        tie_break = TieBreak(score=_float_of(threshold), tied=tied, chosen=needed)
    return Selection(masks=keep, tie_break=tie_break)


_HALF = 16
_LOW_MASK = (1 << _HALF) - 1


def _ordered(score: torch.Tensor) -> torch.Tensor:
    """The fp32 scores as int32 keys with the same order (-0.0 counts as 0.0), on their device."""
    bits = score.detach().float().contiguous().view(torch.int32)
    if bool(bits.min() >= 0):  # no sign bit set (Fisher scores): the bits are in float order
        return bits
    bits = (score.detach().float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _float_of(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _kth_bin(
    scores: dict[str, torch.Tensor],
    k: int,
    digit: Callable[[torch.Tensor], torch.Tensor],
    high: int | None,
) -> tuple[int, int]:
    """The 16-bit digit of the k-th largest key (among keys whose high digit is `high`, if
    given), and how many of those keys have a larger digit."""
    counts = torch.zeros(1 << _HALF, dtype=torch.int64)
    for score in scores.values():
        keys = _ordered(score).flatten()
        if high is not None:
            keys = keys[(keys >> _HALF) + (1 << (_HALF - 1)) == high]
        counts += torch.bincount(digit(keys), minlength=1 << _HALF).cpu()
    from_top = counts.flip(0).cumsum(0)
    bin_from_top = int(torch.searchsorted(from_top, k))
    above = int(from_top[bin_from_top - 1]) if bin_from_top else 0
    return (1 << _HALF) - 1 - bin_from_top, above
