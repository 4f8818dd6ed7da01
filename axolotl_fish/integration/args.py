"""The `fish_mask:` block of Axolotl's config schema."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, model_validator

from axolotl_fish.config import FishMaskConfig

# Axolotl's fused LoRA kernels call the LoRA weights directly, bypassing the PEFT module
# forward that the Fisher pass records.
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# None: full fine-tuning, where the mask covers the model's own parameters (the FISH Mask).
SUPPORTED_ADAPTERS = (None, "lora", "qlora")


class FishMaskPluginArgs(BaseModel):
    """Adds `fish_mask:` to the Axolotl config (unique name: Axolotl merges args by class name)."""

    fish_mask: FishMaskConfig | None = None

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
        _check_sharding(data)
        enabled = [key for key in LORA_KERNEL_KEYS if data.get(key)]
        if enabled:
            raise ValueError(
                f"fish_mask cannot record Fisher information through Axolotl's fused LoRA kernels: "
                f"set {', '.join(f'{key}: false' for key in enabled)}."
            )
        return data


def _check_sharding(data: dict[str, Any]) -> None:
    """FSDP2 is supported; FSDP1 and DeepSpeed are refused with the reason and what to use."""
    if data.get("deepspeed"):
        raise ValueError(
            "fish_mask does not support `deepspeed` yet. ZeRO-1/2: restoring frozen entries "
            "would also have to reset DeepSpeed's fp32 master copies (weight decay moves them), "
            "and this was not exercised end to end (accelerate runs DeepSpeed only on GPUs). "
            "ZeRO-3: parameters are partitioned into flat buffers the mask cannot see. Use FSDP2 "
            "instead (`fsdp_version: 2` with an `fsdp_config:` block), or DDP."
        )
    if not (data.get("fsdp") or data.get("fsdp_config")):
        return
    fsdp_config = data.get("fsdp_config") or {}
    version = (
        data.get("fsdp_version") or fsdp_config.get("fsdp_version") or fsdp_config.get("version")
    )
    if str(version) != "2":
        raise ValueError(
            f"fish_mask supports FSDP only as FSDP2: set `fsdp_version: 2` (got "
            f"{version!r}, i.e. FSDP1). FSDP1 flattens each wrapped module's parameters into "
            f"one flat parameter, so the per-tensor mask hooks would never fire."
        )
    for key in ("cpu_ram_efficient_loading", "fsdp_cpu_ram_efficient_loading"):
        if fsdp_config.get(key):
            raise ValueError(
                f"fish_mask cannot score entries with `fsdp_config.{key}: true`: the Fisher pass "
                f"runs before FSDP2 shards the model, when only rank 0 holds the weights (the "
                f"others hold empty tensors). Set `fsdp_config.{key}: false`."
            )
