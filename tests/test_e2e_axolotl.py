"""`axolotl train` with the plugin, through the real CLI in a subprocess."""

from __future__ import annotations

import pytest
import torch
from axolotl_run import load_adapter_tensors, resume_from_copy, run_axolotl_train, write_config
from hub_cache import cache_file

from axolotl_fish.masks.file import MASK_FILENAME, FishMask

pytestmark = pytest.mark.e2e

FISH = {"plugins": ["axolotl_fish.FishMaskPlugin"]}
# Settings that would move masked entries if masking were wrong: decay, clipping, accumulation.
HARSH = {
    "weight_decay": 0.1,
    "max_grad_norm": 0.5,
    "gradient_accumulation_steps": 2,
    "micro_batch_size": 2,
    "lora_dropout": 0.1,
}


def assert_frozen_outside_mask(mask: FishMask, reference: dict, folders) -> None:
    for folder in folders:
        adapter = load_adapter_tensors(folder)
        for key, keep in mask.masks.items():
            assert torch.equal(adapter[key][~keep], reference[key][~keep]), (folder, key)


def resume_with_another_mask(out, tmp_path, base_dir, data, **keys) -> str:
    """Resume `out`'s run from a copy of its checkpoint-2 in `tmp_path`, the config (`keys` and
    HARSH) asking for another mask (strategy and seed): a recomputed mask would differ, the
    checkpoint's must win. Asserts it did (the same mask in every save, every unselected entry at
    checkpoint-2's value) and returns the log."""
    resumed_out = resume_from_copy(out, tmp_path)
    config = write_config(
        tmp_path,
        base_dir,
        data,
        **keys,
        **HARSH,
        fish_mask={"keep_ratio": 0.5, "strategy": "random", "seed": 7},
        auto_resume_from_checkpoints=True,
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    assert "resuming with the mask saved in" in log
    original = FishMask.load(out / "checkpoint-2")
    for folder in (resumed_out / "checkpoint-4", resumed_out):
        resumed = FishMask.load(folder)
        assert all(torch.equal(resumed.masks[k], m) for k, m in original.masks.items())
    assert_frozen_outside_mask(
        original,
        load_adapter_tensors(out / "checkpoint-2"),
        [resumed_out / "checkpoint-4", resumed_out],
    )
    return log


@pytest.fixture(scope="module")
def fish_run(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """One 4-step FISH run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("fish_run")
    fish_mask = {"keep_ratio": 0.5, "num_samples": 24, "strategy": "fisher", "seed": 42}
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **FISH, **HARSH, fish_mask=fish_mask)
    result = run_axolotl_train(config, cwd=tmp)
    return tmp / "out", result.stdout


def test_checkpoints_and_adapter_carry_the_same_exact_k_mask(fish_run):
    out, log = fish_run
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    masks = [FishMask.load(folder / MASK_FILENAME) for folder in folders]
    adapter = load_adapter_tensors(out)
    mask = masks[0]
    assert set(mask.masks) == set(adapter)
    assert all(mask.masks[k].shape == adapter[k].shape for k in adapter)
    assert mask.k == round(0.5 * mask.total) == mask.metadata["k"]
    assert mask.metadata["strategy"] == "fisher" and mask.metadata["num_examples"] == 24
    assert mask.metadata["r"] == 8 and mask.metadata["base_model_name_or_path"]
    for other in masks[1:]:
        assert all(torch.equal(other.masks[k], m) for k, m in mask.masks.items())
    assert "FISH mask: " in log and "Fisher pass: 24 examples" in log


def test_masked_entries_never_move(fish_run):
    out, _ = fish_run
    mask = FishMask.load(out)
    first = load_adapter_tensors(out / "checkpoint-2")
    # lora_B starts at exactly zero: masked B entries must still be zero everywhere.
    zeros = {k: torch.zeros_like(t) for k, t in first.items() if "lora_B" in k}
    b_mask = FishMask({k: mask.masks[k] for k in zeros})
    assert_frozen_outside_mask(b_mask, zeros, [out / "checkpoint-2", out / "checkpoint-4", out])
    assert_frozen_outside_mask(mask, first, [out / "checkpoint-4", out])
    final = load_adapter_tensors(out)
    moved = sum(int((final[k] != first[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0.5 * mask.k


def test_resume_keeps_the_checkpoint_mask(fish_run, tmp_path, tiny_llama_dir, alpaca_jsonl):
    out, _ = fish_run
    log = resume_with_another_mask(out, tmp_path, tiny_llama_dir, alpaca_jsonl, **FISH)
    assert "strategy: config 'random', mask 'fisher'; seed: config 7, mask 42" in log


def test_mask_path_reuses_a_mask_and_rejects_a_foreign_one(
    fish_run, tmp_path, tiny_llama_dir, alpaca_jsonl
):
    """The mask comes from the Hub (`hf://`), resolved offline from a Hub cache folder. Another
    strategy and seed in the config: a recomputed mask would differ, the file must win."""
    out, _ = fish_run
    hub = tmp_path / "hub"
    cache_file(
        hub,
        "fish-org/tiny-fish",
        f"run-1/{MASK_FILENAME}",
        (out / MASK_FILENAME).read_bytes(),
        "v1",
    )
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **FISH,
        max_steps=2,
        fish_mask={
            "keep_ratio": 0.5,
            "mask_path": "hf://fish-org/tiny-fish@v1/run-1",
            "strategy": "random",
            "seed": 7,
        },
    )
    log = run_axolotl_train(config, cwd=tmp_path, env={"HF_HUB_CACHE": str(hub)}).stdout
    assert "no Fisher pass" in log and "fish_mask: scoring" not in log
    reused = FishMask.load(tmp_path / "out")
    original = FishMask.load(out)
    assert all(torch.equal(reused.masks[k], m) for k, m in original.masks.items())
    adapter = load_adapter_tensors(tmp_path / "out")
    for key, keep in original.masks.items():
        if "lora_B" in key:  # starts at exactly 0: only the file's selected entries may move
            assert not adapter[key][~keep].any(), key
            assert adapter[key][keep].any(), key

    foreign = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **FISH,
        lora_target_modules=["q_proj", "k_proj"],
        fish_mask={"keep_ratio": 0.5, "mask_path": str(out / MASK_FILENAME)},
    )
    with pytest.raises(AssertionError, match=r"k_proj\.lora_A\.weight"):
        run_axolotl_train(foreign, cwd=tmp_path)


def test_qwen2_random_match_rank_per_matrix(tmp_path, tiny_qwen2_dir, alpaca_jsonl):
    """Rank 8 masked to the entry count of rank 2, A and B budgets kept apart."""
    fish_mask = {"match_rank": 2, "scope": "per_matrix", "strategy": "random", "seed": 3}
    config = write_config(tmp_path, tiny_qwen2_dir, alpaca_jsonl, **FISH, fish_mask=fish_mask)
    run_axolotl_train(config, cwd=tmp_path)
    mask = FishMask.load(tmp_path / "out")
    assert mask.k == mask.total // 4  # every tensor is a LoRA factor: rank 2 of 8
    for matrix in ("lora_A", "lora_B"):
        part = [m for key, m in mask.masks.items() if matrix in key]
        assert sum(int(m.sum()) for m in part) == sum(m.numel() for m in part) // 4
    assert "num_examples" not in mask.metadata  # no Fisher pass for random
    assert_frozen_outside_mask(
        mask, load_adapter_tensors(tmp_path / "out" / "checkpoint-2"), [tmp_path / "out"]
    )


def test_same_config_gives_the_same_mask_and_adapter(
    fish_run, tmp_path, tiny_llama_dir, alpaca_jsonl
):
    """The plugin seeds before the adapter is built: a rerun reproduces init, mask and training."""
    out, _ = fish_run
    fish_mask = {"keep_ratio": 0.5, "num_samples": 24, "strategy": "fisher", "seed": 42}
    config = write_config(
        tmp_path, tiny_llama_dir, alpaca_jsonl, **FISH, **HARSH, fish_mask=fish_mask
    )
    run_axolotl_train(config, cwd=tmp_path)
    again, first = FishMask.load(tmp_path / "out"), FishMask.load(out)
    assert all(torch.equal(again.masks[k], m) for k, m in first.masks.items())
    rerun, original = load_adapter_tensors(tmp_path / "out"), load_adapter_tensors(out)
    for key, value in original.items():
        torch.testing.assert_close(rerun[key], value, rtol=1e-5, atol=1e-7)


def test_warmup_then_restore(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """Warm-up gives lora_A real scores; after restore masked B entries are still exactly 0."""
    fish_mask = {"keep_ratio": 0.5, "num_samples": 16, "warmup_steps": 2}
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, **FISH, fish_mask=fish_mask)
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    mask = FishMask.load(tmp_path / "out")
    assert mask.metadata["warmup_steps"] == 2 and "tie_breaks" not in mask.metadata
    assert "ties:" not in log
    adapter = load_adapter_tensors(tmp_path / "out")
    for key, keep in mask.masks.items():
        if "lora_B" in key:
            assert not adapter[key][~keep].any(), key


@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("llama", {"peft_use_dora": True, "lora_modules_to_save": ["lm_head"]}),
        ("llama", {"peft_use_rslora": True, "peft_init_lora_weights": "pissa"}),
        ("qwen2", {"peft_init_lora_weights": "olora", "lora_target_linear": True}),
        ("llama", {"lora_target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
        ("gpt2", {}),
    ],
    ids=["dora+modules_to_save", "rslora+pissa", "olora+target_linear", "embedding", "gpt2-conv1d"],
)
def test_adapter_variants_keep_exact_k_and_frozen_entries(
    tmp_path, tiny_model_dir, alpaca_jsonl, arch, variant
):
    fish_mask = {"keep_ratio": 0.3, "num_samples": 8}
    config = write_config(
        tmp_path,
        tiny_model_dir(arch),
        alpaca_jsonl,
        **FISH,
        **HARSH,
        **variant,
        fish_mask=fish_mask,
    )
    run_axolotl_train(config, cwd=tmp_path)
    out = tmp_path / "out"
    mask = FishMask.load(out)
    adapter = load_adapter_tensors(out)
    # PEFT also saves the frozen base embedding when embeddings are targeted; it is not masked.
    assert set(mask.masks) == {key for key in adapter if ".base_layer." not in key}
    assert mask.k == round(0.3 * mask.total)
    assert_frozen_outside_mask(mask, load_adapter_tensors(out / "checkpoint-2"), [out])


def test_sample_packing_with_gradient_checkpointing_and_accumulation(
    tmp_path, tiny_llama_dir, alpaca_jsonl
):
    fish_mask = {"keep_ratio": 0.5, "num_samples": 8}
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **FISH,
        **HARSH,
        sample_packing=True,
        pad_to_sequence_len=True,
        gradient_checkpointing=True,
        fish_mask=fish_mask,
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    assert "gradient_checkpointing: the pass checkpoints 2 layers" in log  # as training does
    out = tmp_path / "out"
    mask = FishMask.load(out)
    assert mask.k == round(0.5 * mask.total) and mask.metadata["num_examples"] == 8
    assert_frozen_outside_mask(mask, load_adapter_tensors(out / "checkpoint-2"), [out])
