"""Where and when the Fisher pass runs under FSDP2.

When: on the sharded model once training starts, wherever the run allows it
(`scores_after_sharding`, which logs what it decided and why), else before sharding.
Where, before sharding: Axolotl loads an FSDP model without a device map, on CPU, and the
Trainer leaves it there until FSDP2 shards it onto the accelerators; scoring it in place would
run every forward and backward of the pass on the CPU (`on_training_device`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from torch import nn

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.distributed.sharded_scoring import why_not_after_sharding
from axolotl_fish.integration.args import EFFICIENT_LOADING_KEYS

LOG = get_logger(__name__)


@contextmanager
def on_training_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block with `model` on `device` when the model sits on the CPU and training runs on
    an accelerator, and put it back on the CPU afterwards (where FSDP2's wrapping expects it).
    Running out of device memory says what to do instead."""
    if device.type == "cpu" or any(p.device.type != "cpu" for p in model.parameters()):
        yield
        return
    LOG.info(
        f"fish_mask: the model is on CPU (Axolotl loads FSDP models there); moving it to "
        f"{device} for the Fisher pass, and back to CPU for FSDP2 to shard"
    )
    try:
        model.to(device)
        yield
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"fish_mask: the Fisher pass needs the whole model on one device and {device} ran "
            f"out of memory. Compute the mask where the model fits (`axolotl fish-mask compute "
            f"CONFIG --output MASK`, on a larger device or on CPU) and train with "
            f"`fish_mask.mask_path: MASK`."
        ) from err
    finally:
        model.to("cpu")


def under_fsdp2(cfg: DictDefault) -> bool:
    return bool(cfg.fsdp or cfg.fsdp_config)  # the schema admits FSDP only as FSDP2


def scores_after_sharding(cfg: DictDefault, model: nn.Module, config: FishMaskConfig) -> bool:
    """Whether the mask is computed when training starts, on the model FSDP2 has sharded
    (`fish_mask.score_after_sharding`; unset: whenever the run allows it); logs the decision."""
    efficient = next(
        (key for key in EFFICIENT_LOADING_KEYS if (cfg.fsdp_config or {}).get(key)), None
    )
    wanted = config.score_after_sharding
    if not under_fsdp2(cfg):
        if wanted:
            LOG.warning("fish_mask.score_after_sharding has no effect without FSDP2")
        return False
    if wanted is False:
        reason = "fish_mask.score_after_sharding is false"
    elif (cfg.fsdp_config or {}).get("offload_params"):
        # The pass would place its batches and scores with the CPU-held shards, not on the GPU
        # where FSDP2 computes.
        reason = "fsdp_config.offload_params keeps the sharded parameters on the CPU"
    else:
        reason = why_not_after_sharding(model, config)
    if reason is None:
        LOG.info(
            "fish_mask: the mask is computed when training starts, on the model FSDP2 has "
            "sharded (no device holds the whole model)"
        )
        return True
    if wanted:
        raise ValueError(f"fish_mask.score_after_sharding: true, but {reason}")
    if efficient:  # the other ranks hold no weights before sharding
        raise ValueError(
            f"fsdp_config.{efficient}: true needs the mask made after sharding, but {reason}"
        )
    LOG.info(f"fish_mask: scoring before FSDP2 shards the model, on one device: {reason}")
    return False
