"""`fish_delta.safetensors`: what full-parameter FISH training changed, as indices and values.

Per changed tensor `<key>.indices` (flat int32/int64 positions of the selected entries) and
`<key>.values` (their trained values, in the training dtype); a tensor that trained densely (fully
selected, or outside the mask's include/exclude) has `<key>.values` only: the whole tensor.
The metadata names the base model and holds the SHA-256 of its weights as training saw them
(`base_sha256`, over every tensor of the saved state dict, in the training dtype) and of the
delta itself (`delta_sha256`, checked on load). Applying the delta to the same base rebuilds the
trained `model.safetensors` bit for bit; a base with another digest is refused.

A delta is untrusted input (a shared file whose checksum anyone can recompute): `load` and
`apply` check every tensor name, dtype, length and index before anything is written, and each
error names the file and the tensor. `apply_delta` never writes into the base model's folder
and never beside other files: it builds the output in a fresh folder renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from axolotl_fish.adapters.tensors import saved_state
from axolotl_fish.base.safetensors_io import json_metadata, read, resolve, save_atomically
from axolotl_fish.base.sharded import full_tensor

DELTA_FILENAME = "fish_delta.safetensors"
WEIGHTS_FILENAME = "model.safetensors"
INDEX_FILENAME = "model.safetensors.index.json"
_REQUIRED_METADATA = ("base_sha256", "dtypes")
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
    source: str = "the delta"  # where it was read from, for errors

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
        delta = cls(values=values, indices=indices, metadata=metadata, source=str(path))
        delta.check(tensors)
        return delta

    def _error(self, what: str) -> ValueError:
        return ValueError(f"{self.source}: {what}")

    def check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse what `apply` could not apply exactly (checks that need the base: `apply`)."""
        for name in _REQUIRED_METADATA:
            if name not in self.metadata:
                raise self._error(f"metadata field {name!r} is missing: not a FISH delta.")
        digest = self.metadata["base_sha256"]
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise self._error(f"metadata field 'base_sha256' is not a SHA-256 digest: {digest!r}.")
        dtypes = self.metadata["dtypes"]
        if not isinstance(dtypes, dict) or any(
            not isinstance(getattr(torch, str(name), None), torch.dtype) for name in dtypes.values()
        ):
            raise self._error(
                "metadata field 'dtypes' is not a map of tensor names to torch dtypes."
            )
        for name in tensors:
            if not name.endswith((".values", ".indices")):
                raise self._error(f"tensor {name!r} is neither '<key>.values' nor '<key>.indices'.")
        for key, index in self.indices.items():
            if key not in self.values:
                raise self._error(f"tensor '{key}.indices' has no '{key}.values'.")
            if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
                raise self._error(
                    f"tensor '{key}.indices' must be 1-D int32/int64, not {index.dim()}-D "
                    f"{index.dtype}."
                )
            if self.values[key].shape != index.shape:
                raise self._error(
                    f"tensor '{key}.values' has {self.values[key].numel()} entries for "
                    f"{index.numel()} indices."
                )
            if index.numel() and (int(index.min()) < 0 or index.unique().numel() != index.numel()):
                raise self._error(f"tensor '{key}.indices' holds a negative or repeated index.")
        for key, values in self.values.items():
            if key not in dtypes:
                raise self._error(
                    f"tensor '{key}.values' names no tensor of the base model (metadata 'dtypes')."
                )
            if str(values.dtype).removeprefix("torch.") != dtypes[key]:
                raise self._error(
                    f"tensor '{key}.values' has dtype {values.dtype}; the model trained it in "
                    f"{dtypes[key]}."
                )
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise self._error(f"tensor '{key}.values' holds NaN or infinite values.")

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
            size = weights[key].numel()
            index = self.indices.get(key)
            if index is None and values.numel() != size:
                raise self._error(
                    f"tensor '{key}.values' has {values.numel()} entries; the tensor has {size}."
                )
            if index is not None and index.numel() and int(index.max()) >= size:
                raise self._error(
                    f"tensor '{key}.indices' holds index {int(index.max())}; the tensor has "
                    f"{size} entries."
                )
        for key, values in self.values.items():
            if key in self.indices:
                weights[key].view(-1).index_copy_(0, self.indices[key].long(), values)
            else:
                weights[key] = values.reshape(weights[key].shape).clone()
        return weights


def model_weight_files(folder: Path) -> Mapping[Path, list[str] | None]:
    """The weight files a Hugging Face model folder loads from, as `from_pretrained` finds them:
    the shards `model.safetensors.index.json` lists (with the tensors each holds), else
    `model.safetensors` (all its tensors: None). Other *.safetensors files beside them (a
    Mistral-style `consolidated.safetensors`, a delta) are not the model's weights."""
    index_path = folder / INDEX_FILENAME
    if not index_path.is_file():
        if not (folder / WEIGHTS_FILENAME).is_file():
            raise FileNotFoundError(
                f"{folder} holds neither {WEIGHTS_FILENAME} nor {INDEX_FILENAME}: not a "
                f"safetensors model folder."
            )
        return {folder / WEIGHTS_FILENAME: None}
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[Path, list[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"shard {shard!r} of tensor {key!r} is not a file in {folder}")
            shards.setdefault(folder / shard, []).append(key)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index_path} is not a usable safetensors index: {err}") from err
    return shards


def load_model_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder's safetensors weights (sharded or not)."""
    weights: dict[str, torch.Tensor] = {}
    for file, keys in model_weight_files(folder).items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}, a weights file of the base model, is missing.")
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is not a readable safetensors weights file: {err}") from err
        missing = sorted(set(keys or ()) - set(tensors))
        if missing:
            raise ValueError(
                f"{file} lacks tensor {missing[0]!r}, which {INDEX_FILENAME} places there."
            )
        weights |= tensors if keys is None else {key: tensors[key] for key in keys}
    return weights


def check_output_folder(base_folder: Path, out_folder: Path) -> None:
    """Refuse an output folder that is, or is inside, the base model's folder (by any spelling:
    `..`, a symlink, the same directory under another name), or that already holds files."""
    base, out = base_folder.resolve(), out_folder.resolve()
    same = out.exists() and os.path.samefile(base, out)
    if same or out == base or base in out.parents:
        raise ValueError(
            f"OUT_DIR {out_folder} is the base model's folder {base_folder} (or inside it): "
            f"apply never writes into the base model; name a new folder."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"OUT_DIR {out_folder} already exists and is not an empty folder: apply writes only "
            f"into a new or empty folder, so no stale weights end up beside the new ones."
        )


def apply_delta(base_folder: Path, delta_path: Path, out_folder: Path) -> Path:
    """Write `out_folder` (new or empty): the base folder's files (config, tokenizer, ...) and a
    `model.safetensors` with the delta applied. Everything is written into a fresh folder beside
    it, renamed into place at the end, so a failure leaves nothing behind. Returns the weights
    file."""
    check_output_folder(base_folder, out_folder)
    delta = SparseDelta.load(delta_path)
    weights = delta.apply(load_model_folder(base_folder))
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = out_folder.with_name(f".{out_folder.name}.{os.getpid()}.tmp")
    staging.mkdir()
    try:
        for item in base_folder.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)
        weights = {key: tensor.contiguous() for key, tensor in weights.items()}
        save_atomically(weights, staging / WEIGHTS_FILENAME, {"format": "pt"})
        os.rename(staging, out_folder)  # fails if OUT_DIR got files meanwhile
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_folder / WEIGHTS_FILENAME


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
