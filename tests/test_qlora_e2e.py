"""QLoRA (`adapter: qlora`, `load_in_4bit: true`) with a FISH mask through the real
`axolotl train` CLI on CPU: bitsandbytes' NF4 linears, forward and backward on the CPU.

Every run must prove its base really was 4-bit: the plugin reads the model's layers and logs how
many are bitsandbytes `Linear4bit` with NF4 weights packed 4 per stored bf16 element, as Axolotl
stores them (a run that loaded the model dense logs no such line). QLoRA under FSDP2 is refused
on CPU at validation (`tests/test_plugin_config.py`): Axolotl loads it onto an accelerator.
"""

from __future__ import annotations

import re

import pytest
import torch
from axolotl_run import (
    held_digests,
    load_adapter_tensors,
    run_axolotl_train,
    two_process_launch,
    write_config,
)
from test_e2e_axolotl import (
    FISH,
    HARSH,
    assert_frozen_outside_mask,
    resume_with_another_mask,
)

from axolotl_fish.base.ranks import mask_digest
from axolotl_fish.masks.file import MASK_FILENAME, FishMask

pytestmark = pytest.mark.e2e

QLORA = {**FISH, "adapter": "qlora", "load_in_4bit": True}
# Axolotl's QLoRA storage: 4 NF4 codes per bf16 element (`bnb_4bit_quant_storage`).
FOUR_BIT = re.compile(
    r"fish_mask: the base model is quantized: (\d+) bitsandbytes Linear4bit \(nf4, 4 per "
    r"bfloat16\) layers; the mask covers the adapter only"
)
# 2 decoder layers x 7 projections (q, k, v, o, gate, up, down); lm_head stays dense.
LINEARS = 14


def assert_base_was_4bit(log: str) -> None:
    assert [int(count) for count in FOUR_BIT.findall(log)] == [LINEARS], log[-3000:]


def assert_lora_b_moves_only_inside(mask: FishMask, folders) -> None:
    """lora_B starts at exactly 0: unselected entries are still 0 in every save, and training
    moved selected ones."""
    for folder in folders:
        adapter = load_adapter_tensors(folder)
        for key, keep in mask.masks.items():
            if "lora_B" in key:
                assert not adapter[key][~keep].any(), (folder, key)
    final = load_adapter_tensors(folders[-1])
    assert any(final[key][keep].any() for key, keep in mask.masks.items() if "lora_B" in key)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """One 4-step QLoRA FISH run (weight decay, clipping, accumulation), checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("qlora_run")
    fish_mask = {"keep_ratio": 0.5, "num_samples": 24, "strategy": "fisher", "seed": 42}
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **QLORA, **HARSH, fish_mask=fish_mask)
    return tmp / "out", run_axolotl_train(config, cwd=tmp).stdout


def test_the_base_was_4bit_and_every_save_holds_one_exact_k_mask(qlora_run):
    out, log = qlora_run
    assert_base_was_4bit(log)
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    mask = FishMask.load(out)
    adapter = load_adapter_tensors(out)
    assert set(mask.masks) == set(adapter) and len(adapter) == 8  # A and B of q, v in 2 layers
    assert mask.k == round(0.5 * mask.total) == mask.metadata["k"]
    assert mask.metadata["strategy"] == "fisher" and mask.metadata["num_examples"] == 24
    assert "Fisher pass: 24 examples" in log
    for folder in folders[:2]:
        saved = FishMask.load(folder / MASK_FILENAME)
        assert all(torch.equal(saved.masks[k], m) for k, m in mask.masks.items()), folder


def test_masked_entries_never_move(qlora_run):
    out, _ = qlora_run
    mask = FishMask.load(out)
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    assert_lora_b_moves_only_inside(mask, folders)
    assert_frozen_outside_mask(mask, load_adapter_tensors(folders[0]), folders[1:])


def test_resume_keeps_the_checkpoint_mask(qlora_run, tmp_path, tiny_llama_dir, alpaca_jsonl):
    out, _ = qlora_run
    log = resume_with_another_mask(out, tmp_path, tiny_llama_dir, alpaca_jsonl, **QLORA)
    assert_base_was_4bit(log)
    assert "fish_mask: scoring" not in log


def test_mask_path_reuses_the_saved_mask(qlora_run, tmp_path, tiny_llama_dir, alpaca_jsonl):
    out, _ = qlora_run
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **QLORA,
        max_steps=2,
        fish_mask={"keep_ratio": 0.5, "mask_path": str(out / MASK_FILENAME), "seed": 7},
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    assert_base_was_4bit(log)
    assert "no Fisher pass" in log and "fish_mask: scoring" not in log
    original = FishMask.load(out)
    reused = FishMask.load(tmp_path / "out")
    assert all(torch.equal(reused.masks[k], m) for k, m in original.masks.items())
    assert_lora_b_moves_only_inside(original, [tmp_path / "out" / "checkpoint-2", tmp_path / "out"])


def test_qwen2_under_ddp(tmp_path, tiny_qwen2_dir, alpaca_jsonl):
    """A second architecture, in 2 processes (gloo): both ranks load the 4-bit base, score
    their half of the examples and hold the same mask; masked entries stay put."""
    config = write_config(
        tmp_path,
        tiny_qwen2_dir,
        alpaca_jsonl,
        **QLORA,
        **HARSH,
        curriculum_sampling=True,
        fish_mask={"keep_ratio": 0.3, "num_samples": 16},
    )
    log = run_axolotl_train(
        config, cwd=tmp_path, cli_args=two_process_launch(), env={"ACCELERATE_USE_CPU": "1"}
    ).stdout
    assert_base_was_4bit(log)
    out = tmp_path / "out"
    mask = FishMask.load(out)
    assert held_digests(log) == {"0": mask_digest(mask.masks), "1": mask_digest(mask.masks)}
    assert mask.metadata["world_size"] == 2 and mask.metadata["num_examples"] == 16
    assert mask.k == round(0.3 * mask.total)
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    assert_lora_b_moves_only_inside(mask, folders)
    assert_frozen_outside_mask(mask, load_adapter_tensors(folders[0]), folders[1:])
