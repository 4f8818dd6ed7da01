"""The plugin's keys in Axolotl's config schema: `fish_mask:`, `bottleneck:`, `peft_adapter:`."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.integration.bottleneck import BottleneckArgs
from axolotl_fish.integration.deepspeed import check_deepspeed
from axolotl_fish.scorers import check_strategy

# Axolotl's fused LoRA kernels call the LoRA weights directly, bypassing the PEFT module
# forward that the Fisher pass records.
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# Adapters whose trainable tensors have no rank for fish_mask.match_rank to count (None: full
# fine-tuning, where the mask covers the model's own parameters: the FISH Mask).
NO_RANK = {None: "without an adapter", "llama-adapter": "with `adapter: llama-adapter`"}


class LlamaAdapterSettings(BaseModel):
    """`peft_adapter:` of `adapter: llama-adapter` (PEFT's adaption prompt)."""

    layers: int = Field(ge=1, description="Top decoder layers that get an adaption prompt (L).")
    len: int = Field(ge=1, description="Prompt tokens per adapted layer (K).")


class FishMaskPluginArgs(BottleneckArgs):
    """Adds `fish_mask:` (and `bottleneck:`, for `adapter: bottleneck`) to the Axolotl config
    (unique name: Axolotl merges args by class name).

    Any adapter Axolotl loads is accepted: the mask's candidates are its trainable tensors.
    Axolotl 0.19 builds `adapter: llama-adapter` from `peft_adapter.layers` and `.len` but its
    schema has no `peft_adapter`, so validation drops the block and loading fails; it is
    declared here.
    """

    fish_mask: FishMaskConfig | None = None
    peft_adapter: LlamaAdapterSettings | None = None

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
        if not isinstance(data, dict):
            return data
        adapter = data.get("adapter")
        if adapter == "llama-adapter" and data.get("peft_adapter") is None:
            raise ValueError(
                "adapter: llama-adapter needs `peft_adapter: {layers: L, len: K}` (the top L "
                "decoder layers get K prompt tokens each)."
            )
        if data.get("fish_mask") is None:
            return data
        fish_mask = data["fish_mask"]
        if adapter in NO_RANK and isinstance(fish_mask, dict) and fish_mask.get("match_rank"):
            raise ValueError(
                f"fish_mask.match_rank counts entries of LoRA factors or bottleneck projections "
                f"at a smaller rank; {NO_RANK[adapter]} there is no rank: use keep_ratio or "
                f"keep_params."
            )
        _check_sharding(data)
        enabled = [key for key in LORA_KERNEL_KEYS if data.get(key)]
        if enabled:
            raise ValueError(
                f"fish_mask cannot record Fisher information through Axolotl's fused LoRA kernels: "
                f"set {', '.join(f'{key}: false' for key in enabled)}."
            )
        return data


# Only rank 0 loads the weights; FSDP2 broadcasts them into the other ranks' shards.
EFFICIENT_LOADING_KEYS = ("cpu_ram_efficient_loading", "fsdp_cpu_ram_efficient_loading")


def _check_sharding(data: dict[str, Any]) -> None:
    """FSDP2 and DeepSpeed ZeRO-1/2/3 are supported; FSDP1 is refused with the reason and what
    to use, untested DeepSpeed settings by name."""
    if data.get("deepspeed"):
        check_deepspeed(data)
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
    if data.get("adapter") == "qlora" and not torch.accelerator.is_available():
        raise ValueError(
            "fish_mask with `adapter: qlora` under FSDP2 needs an accelerator: Axolotl 0.19 loads "
            "a QLoRA model for FSDP onto each process's accelerator (device_map "
            "{'': LOCAL_RANK}), and on a machine without one transformers fails while loading. "
            "Here, train QLoRA in one process or under DDP (no fsdp keys), or use `adapter: lora` "
            "under FSDP2."
        )
    efficient = [key for key in EFFICIENT_LOADING_KEYS if fsdp_config.get(key)]
    fish_mask = data.get("fish_mask")
    settings = fish_mask if isinstance(fish_mask, dict) else {}
    if efficient and (
        data.get("adapter") not in ("lora", "qlora", "bottleneck")
        or settings.get("score_after_sharding") is False
    ):
        raise ValueError(
            f"fish_mask with `fsdp_config.{efficient[0]}: true` needs the mask made after FSDP2 "
            f"shards the model, since only rank 0 holds the weights before: `adapter: lora`, "
            f"`qlora` or `bottleneck`, without fish_mask.score_after_sharding: false (adapter "
            f"is {data.get('adapter')!r}). "
            f"Otherwise set `fsdp_config.{efficient[0]}: false`."
        )
