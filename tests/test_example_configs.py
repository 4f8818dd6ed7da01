"""Every shipped example config passes Axolotl's validation with the plugin's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

CONFIGS = sorted((Path(__file__).parent.parent / "example_configs").glob("*.yaml"))


def test_there_are_examples():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    if "fish_mask" in raw:
        for key, value in raw["fish_mask"].items():
            assert validated.fish_mask[key] == value, key
        assert validated.lora_qkv_kernel is False or raw.get("adapter") not in ("lora", "qlora")
    assert validated.output_dir.startswith("./outputs/")


def test_gpu_example_is_the_papers_setting():
    """Qwen2.5-7B on GSM8K from the hub in bf16: validated here, not loaded (no GPU, no hub)."""
    raw = yaml.safe_load((CONFIGS[0].parent / "qwen2_5_7b_gsm8k_fish.yaml").read_text())
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    assert validated.base_model == "Qwen/Qwen2.5-7B" and validated.adapter == "lora"
    assert validated.datasets[0]["path"] == "openai/gsm8k" and validated.bf16 is True
    assert validated.fish_mask["strategy"] == "fisher" and validated.num_epochs == 4
