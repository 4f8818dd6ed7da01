"""Dense warm-up before the Fisher pass: real lora_A scores, honest budget after restore."""

from __future__ import annotations

import torch
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish import FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import adapter_parameters


def fished(warmup_steps: int, restore: bool = True, strategy: str = "fisher"):
    model = tiny_lora_model("llama", nonzero_b=False)  # PEFT's init: B = 0
    initial = {k: p.detach().clone() for k, p in adapter_parameters(model).items()}
    config = FishMaskConfig(
        keep_ratio=0.7,
        num_samples=8,
        strategy=strategy,
        warmup_steps=warmup_steps,
        restore_after_warmup=restore,
    )
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    mask = compute_fish_mask(
        model, padded_batches(16, 4), config, learning_rate=1e-2, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng)
    after = {k: p.detach() for k, p in adapter_parameters(model).items()}
    return mask, initial, after


def test_without_warmup_the_a_part_is_decided_by_ties():
    mask, _, _ = fished(warmup_steps=0)
    assert mask.metadata["tie_breaks"][0]["score"] == 0.0


def test_warmup_gives_lora_a_real_scores_and_restore_returns_to_init():
    mask, initial, after = fished(warmup_steps=3)
    assert "tie_breaks" not in mask.metadata
    assert mask.metadata["warmup_steps"] == 3 and mask.metadata["restore_after_warmup"]
    assert mask.k == round(0.7 * mask.total)
    for key, value in after.items():
        assert torch.equal(value, initial[key]), key


def test_without_restore_training_starts_from_the_warmed_adapter():
    _, initial, after = fished(warmup_steps=3, restore=False)
    assert any(not torch.equal(after[k], initial[k]) for k in initial if "lora_B" in k)


def test_random_strategy_warms_up_too():
    mask, initial, after = fished(warmup_steps=2, restore=False, strategy="random")
    assert mask.metadata["warmup_steps"] == 2
    assert any(not torch.equal(after[k], initial[k]) for k in initial)
