"""A mask that leaves an adapter module's update at exactly 0 is named, logged and recorded.

LoRA's B and a bottleneck's up-projection start at 0; a module whose output side gets no selected
entry never changes the model (the paper's `reverse` ablation at LoRA's initialisation does this
to every module)."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_peft import padded_batches, tiny_base_model, tiny_lora_model

from axolotl_fish import FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.bottleneck import BottleneckConfig, add_bottleneck, bottleneck_parameters
from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.pipeline.provenance import check_mask_fits
from axolotl_fish.reports.summary import summarize
from axolotl_fish.training.zero_updates import modules_fixed_at_zero


def lora_modules(params) -> set[str]:
    return {key.removesuffix(".lora_B.weight") for key in params if key.endswith("lora_B.weight")}


def test_reverse_at_lora_init_fixes_every_module_and_says_so(caplog):
    # r=4 on q (32->32), v (32->16), down (64->32): |A| = 512, |B| = 320 per layer. k = 30% of
    # the entries is fewer than |A|, and every lora_A entry scores 0 (the lowest) while B = 0.
    model = tiny_lora_model("llama", nonzero_b=False)
    params = adapter_parameters(model)
    config = FishMaskConfig(keep_ratio=0.3, num_samples=8, strategy="reverse")
    with caplog.at_level(logging.WARNING, logger="axolotl_fish.training.zero_updates"):
        mask = compute_fish_mask(model, padded_batches(8, 4), config, progress=False)
    assert not any(m.any() for key, m in mask.masks.items() if "lora_B" in key)
    fixed = mask.metadata["modules_fixed_at_zero"]
    assert set(fixed) == lora_modules(params) and len(fixed) == 6
    assert f"{len(fixed)} adapter module(s) get no entry on their output side" in caplog.text
    assert "Strategy 'reverse'" in caplog.text
    assert f"update fixed at 0: {len(fixed)} module(s)" in summarize(mask)


@pytest.mark.parametrize(
    "strategy, scope",
    [("fisher", "global"), ("reverse", "per_tensor")],
    ids=["fisher", "per-tensor"],
)
def test_masks_that_reach_every_output_side_record_nothing(strategy, scope, caplog):
    model = tiny_lora_model("llama", nonzero_b=False)
    config = FishMaskConfig(keep_ratio=0.3, num_samples=8, strategy=strategy, scope=scope)
    with caplog.at_level(logging.WARNING, logger="axolotl_fish.training.zero_updates"):
        mask = compute_fish_mask(model, padded_batches(8, 4), config, progress=False)
    assert "modules_fixed_at_zero" not in mask.metadata
    assert "output side" not in caplog.text
    assert "update fixed at 0" not in summarize(mask)


def test_a_loaded_mask_is_checked_against_the_adapter_it_applies_to(caplog):
    """`mask_path` onto a fresh zero-B adapter: warned and recorded as at compute time, naming the
    file; onto a non-zero B (PiSSA-like) the mask's own record is dropped, as nothing is fixed."""
    config = FishMaskConfig(keep_ratio=0.3, num_samples=8, strategy="reverse")
    made = tiny_lora_model("llama", nonzero_b=False)
    mask = compute_fish_mask(made, padded_batches(8, 4), config, progress=False)
    recorded = list(mask.metadata["modules_fixed_at_zero"])
    mask.metadata["modules_fixed_at_zero"] = ["stale"]
    with caplog.at_level(logging.WARNING, logger="axolotl_fish.training.zero_updates"):
        check_mask_fits(mask, tiny_lora_model("llama", seed=1, nonzero_b=False), "m.safetensors")
    assert mask.metadata["modules_fixed_at_zero"] == recorded
    assert "The mask m.safetensors decided this" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="axolotl_fish.training.zero_updates"):
        check_mask_fits(mask, tiny_lora_model("llama", nonzero_b=True), "m.safetensors")
    assert "modules_fixed_at_zero" not in mask.metadata
    assert "output side" not in caplog.text


def test_a_non_zero_output_side_can_move_without_selected_entries():
    """PiSSA-like: B is not zero, so training A alone changes the update."""
    model = tiny_lora_model("llama", nonzero_b=True)
    params = adapter_parameters(model)
    masks = {key: torch.zeros_like(p, dtype=torch.bool) for key, p in params.items()}
    assert modules_fixed_at_zero(params, masks) == []
    zero_b = {key: torch.zeros_like(p) if "lora_B" in key else p for key, p in params.items()}
    assert set(modules_fixed_at_zero(zero_b, masks)) == lora_modules(params)
    one = next(key for key in params if "lora_B" in key)
    masks[one].view(-1)[0] = True
    assert one.removesuffix(".lora_B.weight") not in modules_fixed_at_zero(zero_b, masks)


def test_a_bottleneck_is_fixed_only_if_neither_up_weight_nor_up_bias_is_selected():
    model = add_bottleneck(tiny_base_model(), BottleneckConfig(size=4))
    params = bottleneck_parameters(model)
    masks = {key: torch.ones_like(p, dtype=torch.bool) for key, p in params.items()}
    ups = [key for key in params if ".bottleneck.up." in key]
    assert ups and all(not params[key].any() for key in ups)  # zero at init
    for key in ups:
        masks[key].zero_()
    modules = {key.rsplit(".up.", 1)[0] for key in ups}
    assert set(modules_fixed_at_zero(params, masks)) == modules
    bias = next(key for key in ups if key.endswith("up.bias"))
    masks[bias].view(-1)[0] = True
    assert set(modules_fixed_at_zero(params, masks)) == modules - {bias.rsplit(".up.", 1)[0]}
