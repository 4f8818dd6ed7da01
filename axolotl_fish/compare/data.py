"""The protocol's data: the training file of the config, a validation split taken from it, the
held-out test file, their content hashes and the check that they are disjoint.

Rows are compared by content (the whole row, keys sorted), never by file name: a duplicated row
stays on one side of the split, and a test row that also occurs in the training data is an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_SUFFIXES = (".json", ".jsonl")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file, or of a JSON file holding a list of objects."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON or JSON Lines: {err}") from err
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path} holds no rows of JSON objects")
    return rows


def row_key(row: dict[str, Any]) -> str:
    """A row's content, independent of key order and file."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def rows_hash(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row_key(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@dataclass(frozen=True)
class Splits:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]

    @property
    def content_hash(self) -> str:
        """One hash of the three splits' content."""
        parts = (rows_hash(self.train), rows_hash(self.val), rows_hash(self.test))
        return hashlib.sha256("".join(parts).encode()).hexdigest()


def split(
    train_rows: list[dict[str, Any]],
    test_rows: list[dict[str, Any]],
    val_size: int,
    seed: int = 0,
    names: tuple[str, str] = ("the training data", "the test file"),
) -> Splits:
    """Validation rows: a seeded draw of `val_size` distinct rows of the training data, every copy
    of them removed from training. Raises ValueError when the test file shares a row with the
    training data, or when too few distinct rows are left to train on."""
    distinct = list(dict.fromkeys(row_key(row) for row in train_rows))
    if val_size < 1 or val_size >= len(distinct):
        raise ValueError(
            f"--val-size {val_size}: {names[0]} has {len(distinct)} distinct rows; the validation "
            "split needs at least 1 and must leave rows to train on"
        )
    random.Random(seed).shuffle(distinct)
    val_keys = set(distinct[:val_size])
    splits = Splits(
        train=[row for row in train_rows if row_key(row) not in val_keys],
        val=[json.loads(key) for key in distinct[:val_size]],
        test=test_rows,
    )
    check_disjoint(splits, names)
    return splits


def check_disjoint(splits: Splits, names: tuple[str, str]) -> None:
    """Training, validation and test rows share no content (an error, not a warning)."""
    train = {row_key(row) for row in splits.train}
    val = {row_key(row) for row in splits.val}
    if train & val:
        raise ValueError(f"{len(train & val)} validation rows also occur in training")
    test = [row_key(row) for row in splits.test]
    shared = [key for key in test if key in train or key in val]
    if shared:
        raise ValueError(
            f"{len(shared)} of {len(test)} rows of {names[1]} also occur in {names[0]}, e.g. "
            f"{shared[0][:200]}: held-out rows must be new to the model"
        )


def local_dataset(config: dict[str, Any], config_path: Path, cwd: Path) -> Path:
    """The path of the config's one local JSON / JSON Lines dataset (the validation split is
    taken from it); relative paths are read from `cwd`, as `axolotl train` reads them."""
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or len(datasets) != 1:
        count = len(datasets) if isinstance(datasets, list) else 0
        raise ValueError(
            f"{config_path}: `datasets` lists {count} datasets; compare takes its validation "
            "split from one local JSON or JSON Lines dataset"
        )
    entry = datasets[0]
    path = Path(str(entry.get("path", "")))
    path = path if path.is_absolute() else cwd / path
    if path.suffix not in JSON_SUFFIXES or not path.is_file():
        raise ValueError(
            f"{config_path}: datasets[0].path {entry.get('path')!r} is not a local .json or "
            ".jsonl file; compare needs the training rows on disk to split validation from them"
        )
    return path
