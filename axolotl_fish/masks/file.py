"""`fish_mask.safetensors`: one bool tensor per candidate tensor, keyed like the saved weights
(`adapter_model.safetensors`, or `model.safetensors` in full-parameter mode).

Safetensors only (never pickle), so a shared mask cannot run code. Metadata values are stored as
JSON strings; they are untrusted input, so `load` checks every field the package reads (type and
range, regexes that compile) once, with an error naming the file and the field. Writes go to a
temporary file that is renamed into place, so a crash never leaves a partial mask and rewriting
the same mask is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from axolotl_fish.base.safetensors_io import json_metadata, read, resolve, save_atomically
from axolotl_fish.config import FisherKind, Scope, check_patterns

MASK_FILENAME = "fish_mask.safetensors"

Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# One line of text: it is printed in logs and put into model cards.
Line = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=1000)]


def _regexes(patterns: list[str] | None) -> list[str] | None:
    check_patterns(patterns or ())
    return patterns


Patterns = Annotated[list[str] | None, AfterValidator(_regexes)]


class TieRecord(BaseModel):
    """A `tie_breaks` entry (masks.selection.TieBreak)."""

    model_config = ConfigDict(strict=True)
    score: float  # a scorer may tie entries at -inf
    tied: Count
    chosen: Count


class MaskMetadata(BaseModel):
    """The metadata fields the package reads, with their types; others (a scorer's own facts,
    adapter settings compared only for equality) pass as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    strategy: Line | None = None
    fisher: FisherKind | None = None
    scope: Scope | None = None
    keep_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    keep_params: Positive | None = None
    match_rank: Positive | None = None
    k: Count | None = None
    total: Count | None = None
    num_samples: Positive | None = None
    num_examples: Count | None = None
    fisher_seconds: Seconds | None = None
    fisher_chunks: Positive | None = None
    warmup_steps: Count | None = None
    restore_after_warmup: bool | None = None
    seed: int | None = None
    include: Patterns = Field(default=None, min_length=1)
    exclude: Patterns = None
    dense_outside: Count | None = None
    world_size: Positive | None = None
    tie_breaks: list[TieRecord] = []
    modules_fixed_at_zero: list[Line] = []
    axolotl_fish_version: Line | None = None
    peft_type: Line | None = None


def check_metadata(metadata: Mapping[str, Any], path: Path) -> None:
    """Raise ValueError naming `path` and the first field whose value the package cannot use."""
    try:
        MaskMetadata.model_validate(dict(metadata))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        value = repr(first["input"])
        value = value if len(value) <= 80 else value[:77] + "..."
        raise ValueError(
            f"{path}: metadata field {where!r} is unusable ({first['msg']}; got {value})."
        ) from None


@dataclass
class FishMask:
    """Which entries train (True) and how that was decided."""

    masks: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to `path` (a file, or a folder that gets `fish_mask.safetensors`)."""
        path = resolve(path, MASK_FILENAME)
        tensors = {
            key: mask.detach().to("cpu", torch.bool).contiguous()
            for key, mask in self.masks.items()
        }
        return save_atomically(tensors, path, json_metadata(self.metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FishMask:
        """Read a mask file (or a folder holding one), with errors that name the file."""
        path = resolve(path, MASK_FILENAME)
        tensors, metadata = read(path, "mask")
        for key, tensor in tensors.items():
            if tensor.dtype not in (torch.bool, torch.uint8):
                raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected bool.")
        check_metadata(metadata, path)
        return cls(masks={k: t.bool() for k, t in tensors.items()}, metadata=metadata)

    def check_matches(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise if keys or shapes differ from the candidate tensors the mask is applied to."""
        missing = sorted(set(tensors) - set(self.masks))
        if missing:
            raise ValueError(
                f"The mask has no entry for tensor {missing[0]!r} ({len(missing)} missing)."
            )
        unknown = sorted(set(self.masks) - set(tensors))
        if unknown:
            raise ValueError(
                f"The mask has tensor {unknown[0]!r}, which the model lacks "
                f"({len(unknown)} unknown)."
            )
        for key, tensor in tensors.items():
            if tuple(self.masks[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"Mask shape {tuple(self.masks[key].shape)} for tensor {key!r} does not match "
                    f"the model's {tuple(tensor.shape)}."
                )
