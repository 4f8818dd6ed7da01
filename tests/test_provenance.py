"""A saved mask applied to a model: refused when it cannot fit, with the adapter settings that
explain why; a warning when it fits but was made for another adapter."""

from __future__ import annotations

import logging

import pytest
from peft import LoraConfig, get_peft_model
from tiny_peft import TARGETS, padded_batches, tiny_base_model, tiny_lora_model

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.pipeline.compute import compute_fish_mask
from axolotl_fish.pipeline.provenance import check_mask_fits


def rank_8_model():
    config = LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS["llama"])
    return get_peft_model(tiny_base_model(), config)


def random_mask(model=None):
    model = model or tiny_lora_model()
    config = FishMaskConfig(keep_ratio=0.5, strategy="random")
    return compute_fish_mask(model, padded_batches(4, 4), config, progress=False)


def test_a_mask_of_this_adapter_fits_silently(caplog):
    mask = random_mask()
    with caplog.at_level(logging.WARNING):
        check_mask_fits(mask, tiny_lora_model(seed=1), "m.safetensors")
    assert not caplog.records


def test_another_rank_is_an_error_naming_tensor_and_setting():
    mask = random_mask(rank_8_model())
    with pytest.raises(
        ValueError, match=r"m\.safetensors does not fit this model: Mask shape"
    ) as err:
        check_mask_fits(mask, tiny_lora_model(), "m.safetensors")
    assert "It was made for another adapter (r: mask 8, this run 4)" in str(err.value)


def test_other_targets_are_an_error_naming_the_targets():
    mask = random_mask()
    with pytest.raises(ValueError, match=r"no entry for tensor .*k_proj\.lora_A") as err:
        check_mask_fits(mask, tiny_lora_model(extra_targets=("k_proj",)), "m.safetensors")
    assert "target_modules: mask ['down_proj', 'q_proj', 'v_proj'], this run [" in str(err.value)


def test_other_base_model_or_alpha_is_a_warning(caplog):
    mask = random_mask()
    mask.metadata["base_model_name_or_path"] = "Qwen/Qwen2.5-7B"
    mask.metadata["lora_alpha"] = 32
    model = tiny_lora_model()
    # a model built from a config has no name: '' on PEFT 0.20, None on 0.21
    this_run = model.peft_config["default"].base_model_name_or_path
    with caplog.at_level(logging.WARNING):
        check_mask_fits(mask, model, "m.safetensors")
    (record,) = caplog.records
    assert "m.safetensors was made for another adapter, used as saved" in record.message
    expected = f"base_model_name_or_path: mask 'Qwen/Qwen2.5-7B', this run {this_run!r}"
    assert expected in record.message
    assert "lora_alpha: mask 32, this run 8" in record.message
