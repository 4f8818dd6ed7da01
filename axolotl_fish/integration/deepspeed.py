"""`deepspeed:` runs: the DeepSpeed config checked at validation, the Fisher pass on a model
Axolotl loaded under ZeRO-3's `zero.Init`, and the mask's callback.

DeepSpeed is the optional `deepspeed` extra: `axolotl_fish.distributed.deepspeed` (which imports
it) is imported only for runs that name a DeepSpeed config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from axolotl_fish.masks.file import FishMask
from axolotl_fish.training.callback import FishMaskCallback

LOG = get_logger(__name__)


def check_deepspeed(data: Mapping[str, Any]) -> None:
    """Validation of a config with `fish_mask:` and `deepspeed:` (a JSON file or a dict):
    refuses untested DeepSpeed settings by name, and runs without the extra."""
    value = data["deepspeed"]
    if isinstance(value, Mapping):
        config = value
    else:
        try:
            config = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"deepspeed: cannot read the DeepSpeed config {value!r}: {err}"
            ) from err
    adapter = data.get("adapter")
    stage = _deepspeed_module().check_deepspeed_config(config, full_parameter=adapter is None)
    if stage == 3 and adapter == "lora" and data.get("peft_use_dora"):
        raise ValueError(
            "fish_mask under deepspeed ZeRO-3: peft_use_dora: true fails in PEFT itself, plugin or "
            "not: its DoRA init takes the norm of the base weight that zero.Init left empty (tried "
            "with PEFT 0.20 on 2 processes). Use zero_optimization.stage 1 or 2, or FSDP2."
        )
    if adapter in ("qlora", "llama-adapter") or (stage == 3 and adapter == "bottleneck"):
        raise ValueError(
            f"fish_mask under deepspeed ZeRO-{stage}: adapter: {adapter} has not been run there "
            f"yet (tested: LoRA at ZeRO-1/2/3; DoRA, bottleneck and full-parameter mode at "
            f"ZeRO-1/2): train it with DDP or FSDP2, or use `adapter: lora`."
        )


@contextmanager
def whole_for_scoring(cfg: DictDefault, model: nn.Module) -> Iterator[None]:
    """The block (the Fisher pass) with `model` whole: under ZeRO-3, Axolotl loaded it under
    `zero.Init`, so its weights are partitioned and empty here; they are gathered on every rank
    (the whole model per rank, as FSDP2's full-parameter pass) and partitioned again after."""
    if not cfg.deepspeed:
        yield
        return
    deepspeed = _deepspeed_module()
    if not deepspeed.is_partitioned(model):
        yield
        return
    LOG.info(
        "fish_mask: ZeRO-3 partitioned the model at load (zero.Init); gathering it whole on every "
        "rank for the Fisher pass (or pass fish_mask.mask_path to skip the pass)"
    )
    with deepspeed.gathered(model):
        yield


def mask_callback(cfg: DictDefault, model: nn.Module, mask: FishMask) -> FishMaskCallback:
    """The callback that trains `model` under `mask`: with DeepSpeed, the one that also restores
    DeepSpeed's fp32 masters (full-parameter mode then trains dense-masked)."""
    if not cfg.deepspeed:
        return FishMaskCallback(model, mask)
    deepspeed = _deepspeed_module()
    note = deepspeed.full_parameter_note(model)
    if note is not None:
        LOG.info(note)
    return deepspeed.DeepSpeedFishMaskCallback(model, mask, zero3=is_deepspeed_zero3_enabled())


def _deepspeed_module() -> Any:
    try:
        from axolotl_fish.distributed import deepspeed
    except ImportError as err:
        raise ValueError(
            f"fish_mask with `deepspeed:` needs DeepSpeed ({err}): "
            f"`DS_BUILD_OPS=0 pip install 'axolotl-fish[deepspeed]'`."
        ) from err
    return deepspeed
