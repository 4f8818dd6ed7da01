"""What every rank must agree on: summed Fisher scores, shares of the data, identical masks.

Every function is a no-op outside torch.distributed, so single-process code calls them freely.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from axolotl_fish.base.sharded import is_sharded


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def share_of(total: int) -> int:
    """This rank's part of `total` examples: the parts add up to exactly `total`."""
    rank, world = rank_and_world()
    return total // world + (1 if rank < total % world else 0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (every rank must call it: a collective)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(scores: Mapping[str, torch.Tensor], count: int) -> int:
    """Sum score tensors in place, and example counts, over all ranks; return the total count.

    Summing squared per-example gradients (not squaring a DDP-averaged gradient) keeps the
    estimate exact: the result equals one process scoring every rank's examples.
    """
    if not is_distributed():
        return count
    device = next(iter(scores.values())).device
    total = torch.tensor([count], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    for score in scores.values():
        torch.distributed.all_reduce(score)
    return int(total.item())


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average .grad over ranks in place, as DDP would (for loops that run outside DDP). The
    gradients of FSDP2-sharded parameters (DTensors) are left alone: FSDP2's reduce-scatter has
    already averaged them."""
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    for param in params:
        if param.grad is not None and not is_sharded(param.grad):
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)


def mask_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over keys, shapes and bits: equal digests mean equal masks."""
    digest = hashlib.sha256()
    for key in sorted(masks):
        mask = masks[key].detach().to("cpu", torch.bool).contiguous()
        digest.update(f"{key}:{tuple(mask.shape)};".encode())
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


def check_identical_across_ranks(masks: Mapping[str, torch.Tensor]) -> str:
    """Stop with a clear error if any rank holds a different mask than rank 0; return the digest."""
    digest = mask_digest(masks)
    if not is_distributed():
        return digest
    digests: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise RuntimeError(
            f"FISH masks differ across ranks: ranks {differing} disagree with rank 0 "
            f"(digests {digests}). Every rank must train the same entries."
        )
    return digest
