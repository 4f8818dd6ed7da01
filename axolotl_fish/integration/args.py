"""The `fish_mask:` block of Axolotl's config schema."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, field_validator, model_validator

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.scorers import check_strategy

# Axolotl's fused LoRA kernels call the LoRA weights directly, bypassing the PEFT module
# forward that the Fisher pass records.
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# None: full fine-tuning, where the mask covers the model's own parameters (the FISH Mask).
SUPPORTED_ADAPTERS = (None, "lora", "qlora")


class FishMaskPluginArgs(BaseModel):
    """Adds `fish_mask:` to the Axolotl config (unique name: Axolotl merges args by class name)."""

    fish_mask: FishMaskConfig | None = None

    @field_validator("fish_mask")
    @classmethod
    def installed_strategy(cls, fish_mask: FishMaskConfig | None) -> FishMaskConfig | None:
        """An unknown `strategy` fails at validation, listing the installed scorers."""
        if fish_mask is not None:
            try:
                check_strategy(fish_mask.strategy)
            except ValueError as err:
                raise ValueError(f"fish_mask.strategy: {err}") from None
        return fish_mask

    @model_validator(mode="before")
    @classmethod
    def check_fish_mask_context(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("fish_mask") is None:
            return data
        adapter = data.get("adapter")
        if adapter not in SUPPORTED_ADAPTERS:
            raise ValueError(
                f"fish_mask masks the entries of a LoRA adapter (`adapter: lora` or `qlora`) or, "
                f"with no `adapter:`, the model's own parameters; adapter={adapter!r} is not "
                f"supported."
            )
        fish_mask = data["fish_mask"]
        if adapter is None and isinstance(fish_mask, dict) and fish_mask.get("match_rank"):
            raise ValueError(
                "fish_mask.match_rank counts entries of LoRA factors; without an adapter use "
                "keep_ratio or keep_params."
            )
        if adapter == "qlora" and not torch.cuda.is_available():
            raise ValueError(
                "fish_mask with `adapter: qlora` needs bitsandbytes' 4-bit kernels on a CUDA "
                "device, and this machine has none: use `adapter: lora` here."
            )
        sharded = [key for key in ("deepspeed", "fsdp", "fsdp_config") if data.get(key)]
        if sharded:
            raise ValueError(
                f"fish_mask does not support {sharded[0]} yet: sharded or flattened parameters "
                f"would not match the mask. Remove `{sharded[0]}` and train on one device or with "
                f"DDP: `axolotl train CONFIG --launcher accelerate -- --multi_gpu --num_processes "
                f"N` (on CPU, with ACCELERATE_USE_CPU=1)."
            )
        enabled = [key for key in LORA_KERNEL_KEYS if data.get(key)]
        if enabled:
            raise ValueError(
                f"fish_mask cannot record Fisher information through Axolotl's fused LoRA kernels: "
                f"set {', '.join(f'{key}: false' for key in enabled)}."
            )
        return data
