"""Atomic safetensors writes: a temporary file, fsynced, renamed into place.

A crash never leaves a partial file, and rewriting the same file is harmless.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors_atomically(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
