"""`adapter: bottleneck` for Axolotl: the `bottleneck:` config block and the adapter loader
(Axolotl's adapter plugin API), translated to `axolotl_fish.adapters.bottleneck`."""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import AdapterCapabilities
from axolotl.utils.dict import DictDefault
from pydantic import BaseModel, model_validator
from torch import nn
from transformers import Trainer, TrainerCallback

from axolotl_fish.adapters.bottleneck import (
    BottleneckConfig,
    BottleneckSaveCallback,
    add_bottleneck,
    load_bottleneck,
)

ADAPTER = "bottleneck"


class BottleneckArgs(BaseModel):
    """Adds `bottleneck:` (the settings of `adapter: bottleneck`) to the Axolotl config."""

    bottleneck: BottleneckConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def check_bottleneck_context(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        if data.get("bottleneck") is not None and adapter != ADAPTER:
            raise ValueError(
                f"`bottleneck:` settings need `adapter: {ADAPTER}` (adapter is {adapter!r})."
            )
        if adapter != ADAPTER:
            return data
        if data.get("rl"):
            raise ValueError(
                f"adapter: {ADAPTER} supports supervised fine-tuning only: Axolotl's `rl:` "
                f"trainers build their reference model from a PEFT config, which a bottleneck "
                f"adapter does not have."
            )
        quantized = [key for key in ("load_in_4bit", "load_in_8bit", "gptq") if data.get(key)]
        if quantized:
            raise ValueError(
                f"adapter: {ADAPTER} needs a full-precision base model (remove {quantized[0]})."
            )
        return data


def capabilities() -> list[AdapterCapabilities]:
    return [AdapterCapabilities(name=ADAPTER)]


def load(model: nn.Module, cfg: DictDefault, config_only: bool) -> tuple[nn.Module, None] | None:
    """Axolotl's `load_adapter` for `adapter: bottleneck`: fresh adapters, or with
    `lora_model_dir` the adapter saved there (to continue training it, or for inference).
    None for any other adapter (Axolotl then asks the next plugin)."""
    if cfg.adapter != ADAPTER:
        return None
    if config_only:  # only Axolotl's rl trainers ask for a config, and they are refused above
        raise ValueError(f"adapter: {ADAPTER} has no PEFT config to give.")
    if cfg.lora_model_dir:
        load_bottleneck(model, cfg.lora_model_dir)
    else:
        add_bottleneck(model, BottleneckConfig(**(cfg.bottleneck or {})))
    return model, None


def callbacks(cfg: DictDefault, trainer: Trainer) -> list[TrainerCallback]:
    """The callback that saves the adapter beside checkpoints and the final weights."""
    if cfg.adapter != ADAPTER:
        return []
    return [BottleneckSaveCallback(trainer.model)]
