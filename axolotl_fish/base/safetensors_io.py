"""Reading and writing the plugin's safetensors files (masks, deltas): JSON metadata values,
errors that name the file, and atomic writes (a temporary file, fsynced, renamed into place: a
crash never leaves a partial file, and rewriting the same file is harmless). Never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from axolotl_fish.base.atomic import write_atomically


def resolve(path: str | os.PathLike[str], filename: str) -> Path:
    """`path` itself, or `path/filename` when `path` is a folder."""
    path = Path(path)
    return path / filename if path.is_dir() else path


def json_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as JSON strings (safetensors metadata holds strings only)."""
    return {key: json.dumps(value) for key, value in metadata.items()}


def save_atomically(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> Path:
    """Write `tensors` with `metadata` to `path` atomically."""
    return write_atomically(
        path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata))
    )


def read(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of the FISH `what` file ("mask", "delta") at `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"No FISH {what} file at {path}.")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            raw = handle.metadata() or {}
        return tensors, {key: json.loads(value) for key, value in raw.items()}
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors {what} file ({what}s are never read with "
            f"pickle): {err}"
        ) from err
