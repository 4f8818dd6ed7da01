"""Where the Fisher pass runs under FSDP: Axolotl loads an FSDP model without a device map, on
CPU, and the Trainer leaves it there until FSDP2 shards it onto the accelerators. Scoring it in
place would run every forward and backward of the pass on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from axolotl.utils.logging import get_logger
from torch import nn

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
