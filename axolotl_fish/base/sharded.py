"""Masks on parameters that FSDP2 (`fully_shard`) split across ranks.

FSDP2 replaces every parameter by an `nn.Parameter` holding a DTensor: each rank stores one slice
(`Shard(0)`, uneven when the first dimension does not divide by the world size, empty on ranks
past its end). The optimizer steps those slices, so masking acts on them: a full mask is cut to
the same slice as its parameter (no communication: every rank holds the full mask), and
gradients, snapshots and restores work on the local slices. Sparse training's value vectors are
sharded parameters too; writing them back finds each rank's rows of a weight (`flat_range`).
Plain tensors pass through, so one code path serves one device, DDP and FSDP2 alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# Module names that wrappers insert into parameter names: activation checkpointing
# (`checkpoint_wrapper`), `torch.compile`, FSDP1. FSDP2 itself keeps names.
_WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (sharing its storage, so in-place edits reach it); any
    other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_parts(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """`local_part` of each tensor (None stays None) without dispatching an operator, for code
    that must cost the same whatever the number of tensors: `to_local()` on a Parameter holding a
    DTensor returns a fresh view (one operator each), so the DTensor's own local tensor is taken;
    it is the storage FSDP2 all-gathers from and the optimizer steps."""
    return [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective: every rank must call it); any other
    tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of `full` (held whole by every rank) that lines up with this rank's slice of
    `like`; all of it when `like` is not sharded."""
    if not isinstance(like, DTensor):
        return full.to(like.device)
    full = full.to(like.to_local().device)
    # src_data_rank=None: every rank cuts its own slice of the tensor it holds (no broadcast).
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a full bool `mask` that lines up with this rank's slice of `param`."""
    return local_slice(mask.to(torch.bool), param)


def flat_range(param: torch.Tensor) -> tuple[int, int]:
    """The flat positions [begin, end) of the full tensor that this rank's slice of `param`
    holds: FSDP2's row shards (`Shard(0)`, replicated across an HSDP mesh's other dimension) are
    contiguous; a plain tensor holds all of them."""
    if not isinstance(param, DTensor):
        return 0, param.numel()
    if any(not (p.is_shard(0) or p.is_replicate()) for p in param.placements):
        raise ValueError(
            f"fish_mask: sparse training needs parameters sharded along their first dimension "
            f"(FSDP2's default); this one is placed as {param.placements}."
        )
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    row = math.prod(param.shape[1:])
    return offset[0] * row, (offset[0] + shape[0]) * row


def unwrapped_name(name: str) -> str:
    """A parameter's name without the parts wrappers add (`..._checkpoint_wrapped_module.x`)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def names_of(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, str]:
    """`{key: the name the model gives params[key]}`, to find the parameters again by name
    (`parameters_by_name`) once a wrapper has replaced them."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {key: names[id(param)] for key, param in params.items()}


def parameters_by_name(model: nn.Module, names: Mapping[str, str]) -> dict[str, nn.Parameter]:
    """`{key: model's parameter now named names[key]}`, looked up after wrapping: `fully_shard`
    swaps parameter objects for sharded ones under the same names."""
    current = {unwrapped_name(name): param for name, param in model.named_parameters()}
    missing = [name for name in names.values() if unwrapped_name(name) not in current]
    if missing:
        raise ValueError(
            f"fish_mask: after the Trainer prepared the model, parameter {missing[0]!r} "
            f"({len(missing)} in all) is gone; the mask cannot follow it."
        )
    return {key: current[unwrapped_name(name)] for key, name in names.items()}
