"""fish_mask.safetensors: round trip, atomic writes, and errors that name what is wrong."""

from __future__ import annotations

import pickle

import pytest
import torch

import axolotl_fish.base.safetensors_io as safetensors_io
from axolotl_fish.masks.file import MASK_FILENAME, FishMask


def sample_mask() -> FishMask:
    masks = {
        "a.lora_A.weight": torch.tensor([[True, False], [False, True]]),
        "b": torch.ones(3).bool(),
    }
    return FishMask(masks=masks, metadata={"strategy": "fisher", "k": 5, "target_modules": ["q"]})


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = sample_mask().save(tmp_path)
    assert path == tmp_path / MASK_FILENAME
    loaded = FishMask.load(tmp_path)
    assert loaded.metadata == {"strategy": "fisher", "k": 5, "target_modules": ["q"]}
    assert (loaded.k, loaded.total) == (5, 7)
    for key, mask in sample_mask().masks.items():
        assert torch.equal(loaded.masks[key], mask) and loaded.masks[key].dtype == torch.bool
    assert [p.name for p in tmp_path.iterdir()] == [MASK_FILENAME]


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    sample_mask().save(tmp_path)
    before = (tmp_path / MASK_FILENAME).read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", crash)  # the writer of masks and deltas
    changed = FishMask(masks={"x": torch.zeros(2).bool()})
    with pytest.raises(OSError, match="disk full"):
        changed.save(tmp_path)
    assert (tmp_path / MASK_FILENAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [MASK_FILENAME]


def test_saving_twice_is_idempotent(tmp_path):
    sample_mask().save(tmp_path)
    sample_mask().save(tmp_path)
    loaded = FishMask.load(tmp_path)
    assert loaded.metadata == sample_mask().metadata
    assert all(torch.equal(loaded.masks[k], m) for k, m in sample_mask().masks.items())
    assert [p.name for p in tmp_path.iterdir()] == [MASK_FILENAME]


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", pickle.dumps({"a": torch.ones(2)}), b"\x10" * 8],
)
def test_unreadable_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors mask"):
        FishMask.load(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    whole = sample_mask().save(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    for size in (len(whole) - 1, len(whole) // 2, 8):
        path.write_bytes(whole[:size])
        with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors"):
            FishMask.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No FISH mask file"):
        FishMask.load(tmp_path / "nope.safetensors")


def test_check_matches_names_the_tensor():
    mask = sample_mask()
    tensors = {"a.lora_A.weight": torch.zeros(2, 2), "b": torch.zeros(3)}
    mask.check_matches(tensors)
    with pytest.raises(ValueError, match=r"\(2, 2\) for tensor 'a\.lora_A\.weight'.*\(2, 3\)"):
        mask.check_matches({**tensors, "a.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="no entry for tensor 'c'"):
        mask.check_matches({**tensors, "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="tensor 'b', which the model lacks"):
        mask.check_matches({"a.lora_A.weight": torch.zeros(2, 2)})
