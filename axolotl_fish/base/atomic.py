"""Atomic file writes for any file kind: write a temporary file beside the target, fsync it,
rename it into place. A crash never leaves a partial file; the target is never half-written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` to a temporary file beside `path` (same suffix), then rename it into place."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """`text` to `path`, atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text))
