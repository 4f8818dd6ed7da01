"""How many entries train (k) and how the budget is split over tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from axolotl_fish.adapters.tensors import count_entries, rank_axis
from axolotl_fish.config import FishMaskConfig, Scope


def budget(config: FishMaskConfig, tensors: Mapping[str, torch.Tensor]) -> int:
    """k from whichever of keep_ratio, keep_params or match_rank is set; 1 <= k <= total."""
    total = count_entries(tensors)
    if config.keep_ratio is not None:
        k, given = round(config.keep_ratio * total), f"keep_ratio={config.keep_ratio}"
    elif config.keep_params is not None:
        k, given = config.keep_params, f"keep_params={config.keep_params}"
    else:
        k, given = entries_at_rank(tensors, config.match_rank), f"match_rank={config.match_rank}"
    if not 1 <= k <= total:
        raise ValueError(
            f"fish_mask.{given} selects {k} entries, but the candidates have {total} "
            f"(k must be between 1 and {total})."
        )
    return k


def entries_at_rank(tensors: Mapping[str, torch.Tensor], rank: int) -> int:
    """Trainable entries the same adapter would have at `rank`: "rank 16 masked to the size of
    rank 8" trains exactly as many entries as a dense rank-8 adapter. For bottleneck adapters
    `rank` is the bottleneck size: "size 64 masked to size 32"."""
    if all(rank_axis(key) is None for key in tensors):
        raise ValueError(
            "fish_mask.match_rank needs LoRA factors or bottleneck projections among the "
            "candidates (there are none: no adapter with a rank, or include/exclude left none); "
            "use keep_ratio or keep_params."
        )
    total = 0
    for key, tensor in tensors.items():
        axis = rank_axis(key)
        if axis is None:
            total += tensor.numel()
            continue
        current = tensor.shape[axis]
        if rank > current:
            raise ValueError(
                f"fish_mask.match_rank={rank} exceeds the rank {current} of tensor {key!r}."
            )
        total += tensor.numel() // current * rank
    return total


def budget_groups(keys: list[str], scope: Scope) -> list[list[str]]:
    """Tensors that share one ranking: all (global), each alone (per_tensor), or A-like factors,
    B-like factors and the rest (per_matrix)."""
    if scope == "global":
        return [list(keys)]
    if scope == "per_tensor":
        return [[key] for key in keys]
    by_axis: dict[int | None, list[str]] = {0: [], 1: [], None: []}
    for key in keys:
        by_axis[rank_axis(key)].append(key)
    return [group for group in by_axis.values() if group]
