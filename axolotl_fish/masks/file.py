"""`fish_mask.safetensors`: one bool tensor per candidate tensor, keyed like the saved weights
(`adapter_model.safetensors`, or `model.safetensors` in full-parameter mode).

Safetensors only (never pickle), so a shared mask cannot run code. Metadata values are stored as
JSON strings. Writes go to a temporary file that is renamed into place, so a crash never leaves a
partial mask and rewriting the same mask is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from axolotl_fish.base.safetensors_io import json_metadata, read, resolve, save_atomically

MASK_FILENAME = "fish_mask.safetensors"


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
