"""Every shipped example config passes Axolotl's validation with the plugin's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

CONFIGS = sorted((Path(__file__).parent.parent / "example_configs").glob("*.yaml"))


def test_there_are_examples():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    if "fish_mask" in raw:
        for key, value in raw["fish_mask"].items():
            assert validated.fish_mask[key] == value, key
        assert validated.lora_qkv_kernel is False or raw.get("adapter") is None
    assert validated.output_dir.startswith("./outputs/")
