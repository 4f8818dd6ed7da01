"""`fish_delta.safetensors`: what full-parameter FISH training changed, as indices and values.

Per changed tensor `<key>.indices` (flat int32/int64 positions of the selected entries) and
`<key>.values` (their trained values, in the training dtype); a tensor that trained densely (fully
selected, or outside the mask's include/exclude) has `<key>.values` only: the whole tensor.
The metadata names the base model and holds the SHA-256 of its weights as training saw them
(`base_sha256`, over every tensor of the saved state dict, in the training dtype) and of the
delta itself (`delta_sha256`, checked on load). Applying the delta to the same base rebuilds the
trained `model.safetensors` bit for bit; a base with another digest is refused. Writes go to a
temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from axolotl_fish.adapters.tensors import saved_state
from axolotl_fish.base.safetensors_io import json_metadata, read, resolve, save_atomically
from axolotl_fish.base.sharded import full_tensor

DELTA_FILENAME = "fish_delta.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt")


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over keys, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class SparseDelta:
    """Changed entries per tensor (`indices[key]` absent: the whole tensor) and their provenance."""

    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{key}.values": value for key, value in self.values.items()}
        tensors |= {f"{key}.indices": index for key, index in self.indices.items()}
        return {key: t.detach().cpu().contiguous() for key, t in tensors.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to `path` (a file, or a folder that gets `fish_delta.safetensors`)."""
        tensors = self._tensors()
        metadata = self.metadata | {"delta_sha256": weights_digest(tensors)}
        return save_atomically(tensors, resolve(path, DELTA_FILENAME), json_metadata(metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseDelta:
        """Read a delta (or a folder holding one); a damaged file fails its checksum."""
        path = resolve(path, DELTA_FILENAME)
        tensors, metadata = read(path, "delta")
        if metadata.pop("delta_sha256", None) != weights_digest(tensors):
            raise ValueError(f"{path} fails its checksum (delta_sha256): the file is damaged.")
        values = {k.removesuffix(".values"): t for k, t in tensors.items() if k.endswith(".values")}
        indices = {
            k.removesuffix(".indices"): t for k, t in tensors.items() if k.endswith(".indices")
        }
        return cls(values=values, indices=indices, metadata=metadata)

    def apply(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained weights: `base` (the saved state dict of the base model) cast to the
        training dtypes, with the delta written in. Refuses a base other than the one trained."""
        dtypes = self.metadata["dtypes"]
        if set(base) != set(dtypes):
            other = sorted(set(base) ^ set(dtypes))
            raise ValueError(
                f"The base model's tensors differ from those the delta was made on ({other[0]!r} "
                f"and {len(other) - 1} more): this delta is for "
                f"{self.metadata.get('base_model')!r}."
            )
        weights = {key: t.to(getattr(torch, dtypes[key]), copy=True) for key, t in base.items()}
        if weights_digest(weights) != self.metadata["base_sha256"]:
            raise ValueError(
                f"The base model's weights are not those the delta was made on (SHA-256 differs): "
                f"this delta is for {self.metadata.get('base_model')!r}."
            )
        for key, values in self.values.items():
            if key in self.indices:
                weights[key].view(-1).index_copy_(0, self.indices[key].long(), values)
            else:
                weights[key] = values.reshape(weights[key].shape).clone()
        return weights


def load_model_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder's safetensors weights (sharded or not)."""
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != DELTA_FILENAME and not f.name.startswith("fish_")]
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors model weights.")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights |= load_file(file)
    return weights


def apply_delta(base_folder: Path, delta_path: Path, out_folder: Path) -> Path:
    """Write `out_folder`: the base folder's files (config, tokenizer, ...) and a
    `model.safetensors` with the delta applied. Returns the weights file."""
    delta = SparseDelta.load(delta_path)
    weights = delta.apply(load_model_folder(base_folder))
    out_folder.mkdir(parents=True, exist_ok=True)
    for item in base_folder.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, out_folder / item.name)
    weights = {key: tensor.contiguous() for key, tensor in weights.items()}
    return save_atomically(weights, out_folder / "model.safetensors", {"format": "pt"})


class DeltaRecorder:
    """Notes the base model when training starts; `delta()` is the trained change so far.

    `changed` are the tensors that may move (the model's trainable tensors), `masks` the mask of
    those it governs: a partly selected tensor is stored as indices and values, any other
    changed tensor whole (a tensor with no selected entry is left out). Construct it while the
    model still holds the base weights; `record_base=False` skips hashing them (ranks that never
    save).
    """

    def __init__(
        self,
        model: nn.Module,
        changed: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        record_base: bool = True,
    ) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.indices: dict[str, torch.Tensor] = {}
        for key, tensor in changed.items():
            mask = masks.get(key)
            if mask is not None and not mask.any():
                continue
            self.tensors[key] = tensor
            if mask is not None and not mask.all():
                flat = mask.reshape(-1).nonzero()[:, 0].cpu()
                small = tensor.numel() <= torch.iinfo(torch.int32).max
                self.indices[key] = flat.to(torch.int32) if small else flat
        self.metadata: dict[str, Any] = {}
        if record_base:
            state = saved_state(model)
            self.metadata = {
                "base_model": getattr(getattr(model, "config", None), "name_or_path", None),
                "base_sha256": weights_digest(state),
                "dtypes": {key: str(t.dtype).removeprefix("torch.") for key, t in state.items()},
                "k": sum(index.numel() for index in self.indices.values()),
            }

    def bind(self, current: Mapping[str, torch.Tensor]) -> None:
        """Follow the tensors to the ones the Trainer prepared (FSDP2 replaces them)."""
        self.tensors = {key: current[key] for key in self.tensors}

    def delta(self, selected: Mapping[str, torch.Tensor] | None = None) -> SparseDelta:
        """`selected` may give a partly selected tensor's trained values already (sparse
        training holds them), so that tensor is not read. Under FSDP2 a collective: every rank
        gathers each tensor it reads, one at a time."""
        selected = selected or {}
        values = {}
        for key, tensor in self.tensors.items():
            index = self.indices.get(key)
            if index is not None and key in selected:
                values[key] = selected[key].detach().clone()
                continue
            flat = full_tensor(tensor.detach()).reshape(-1)
            values[key] = flat.clone() if index is None else flat[index.to(flat.device).long()]
        return SparseDelta(values=values, indices=dict(self.indices), metadata=self.metadata)
