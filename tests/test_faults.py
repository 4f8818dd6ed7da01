"""Faults: a run killed with SIGKILL resumes with its mask, and checkpoint rotation keeps masks.

(A crash during a mask write is tested in test_mask_file.py: the previous file stays intact.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from axolotl.utils.dict import DictDefault
from axolotl_run import load_adapter_tensors, run_axolotl_train, start_axolotl_train, write_config

from axolotl_fish.integration import _resume_mask_path
from axolotl_fish.masks.file import MASK_FILENAME, FishMask

# k below the lora_B count: masked B entries must stay exactly 0, and every lora_A is frozen.
SETTINGS = {
    "plugins": ["axolotl_fish.FishMaskPlugin"],
    "fish_mask": {"keep_ratio": 0.3, "num_samples": 8},
    "weight_decay": 0.1,
    "max_steps": 40,
    "save_steps": 2,
    "save_total_limit": 2,
    "auto_resume_from_checkpoints": True,
}


def same_mask(a: FishMask, b: FishMask) -> bool:
    return a.masks.keys() == b.masks.keys() and all(
        torch.equal(a.masks[k], b.masks[k]) for k in a.masks
    )


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """A 40-step run SIGKILLed right after its first checkpoint, then the same config again."""
    tmp = tmp_path_factory.mktemp("killed")
    out = tmp / "out"
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **SETTINGS)
    first = out / "checkpoint-2"
    with open(tmp / "killed.log", "w") as log, start_axolotl_train(config, tmp, stdout=log) as proc:
        deadline = time.monotonic() + 240
        while not (first / MASK_FILENAME).is_file():
            assert proc.poll() is None, (tmp / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint-2 within 240 s"
            time.sleep(0.05)
        # A later save rotates checkpoint-2 away: keep its adapter and mask as the reference.
        shutil.copytree(first, tmp / "reference", ignore=shutil.ignore_patterns("*.pt", "*.pth"))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at[-1] < 40 and not (out / "adapter_model.safetensors").exists()
    # The kill may land while a checkpoint is being saved (the resume then takes the newest
    # complete one: it has trainer_state.json) or between a complete checkpoint and its mask.
    last = max(
        (p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    resumes_from = last / MASK_FILENAME if (last / MASK_FILENAME).is_file() else out / MASK_FILENAME
    log = run_axolotl_train(config, cwd=tmp).stdout
    return tmp, resumes_from, log


@pytest.mark.e2e
def test_killed_run_resumes_with_its_mask(killed_then_resumed):
    tmp, resumes_from, log = killed_then_resumed
    out, reference = tmp / "out", tmp / "reference"
    assert f"resuming with the mask saved in {resumes_from}" in log
    assert "fish_mask: scoring entries" not in log
    assert (
        json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())["global_step"] == 40
    )
    mask = FishMask.load(reference)
    assert mask.k == round(0.3 * mask.total)
    initial = load_adapter_tensors(reference)
    for folder in (out / "checkpoint-38", out / "checkpoint-40", out):
        assert same_mask(FishMask.load(folder), mask), folder
        adapter = load_adapter_tensors(folder)
        for key, keep in mask.masks.items():
            if "lora_B" in key:  # initialised to exactly 0
                assert not adapter[key][~keep].any(), (folder, key)
            else:  # fully frozen: still its value at the first checkpoint
                assert not keep.any() and torch.equal(adapter[key], initial[key]), (folder, key)


@pytest.mark.e2e
def test_rotation_removes_whole_checkpoints_and_keeps_the_final_mask(killed_then_resumed):
    tmp, _, _ = killed_then_resumed
    out = tmp / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-38", "checkpoint-40"]
    for folder in (out / "checkpoint-38", out / "checkpoint-40", out):
        assert (folder / MASK_FILENAME).is_file(), folder
    assert not list(out.glob(f"**/.{MASK_FILENAME}.*"))  # no temporary file left anywhere


def test_checkpoint_killed_before_its_mask_resumes_with_the_runs_mask(tmp_path):
    """The Trainer completes a checkpoint before on_save writes its mask; a kill in between
    leaves a checkpoint without one, and the run's mask (written at its start) is used."""
    run_mask = FishMask({"a": torch.tensor([True, False])}, {"strategy": "fisher"})
    run_mask.save(tmp_path)
    (tmp_path / "checkpoint-4").mkdir()
    cfg = DictDefault(
        output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "checkpoint-4")
    )
    assert same_mask(FishMask.load(_resume_mask_path(cfg)), run_mask)
    elsewhere = tmp_path / "other" / "checkpoint-4"
    elsewhere.mkdir(parents=True)
    cfg = DictDefault(output_dir=str(tmp_path), resume_from_checkpoint=str(elsewhere))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4, which has no fish_mask"):
        _resume_mask_path(cfg)


def test_auto_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    """Axolotl's auto-resume would take the newest folder and crash on its missing
    trainer_state.json; the plugin points it at the newest complete checkpoint instead."""
    mask = FishMask({"a": torch.tensor([True, False])}, {"strategy": "fisher"})
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    mask.save(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"partial")
    cfg = DictDefault(output_dir=str(tmp_path), auto_resume_from_checkpoints=True)
    assert _resume_mask_path(cfg) == tmp_path / "checkpoint-2" / MASK_FILENAME
    assert cfg.resume_from_checkpoint == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    cfg = DictDefault(output_dir=str(tmp_path), auto_resume_from_checkpoints=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* was saved completely"):
        _resume_mask_path(cfg)
