"""A Hugging Face Hub cache folder built by hand, laid out as `hf_hub_download` leaves it, so that
Hub references resolve offline exactly as they would after a real download."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_file(
    cache: Path,
    repo_id: str,
    path_in_repo: str,
    data: bytes,
    revision: str = "main",
    repo_type: str = "model",
    commit: str = COMMIT,
) -> Path:
    """Store `data` as `path_in_repo` of `repo_id` at `revision` (a branch or tag pointing at
    `commit`): blobs/<sha256>, snapshots/<commit>/<path> linking to it, refs/<revision>."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / commit / path_in_repo
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.unlink(missing_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot
