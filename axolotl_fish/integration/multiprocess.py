"""Multi-process launches (torchrun, `accelerate launch --multi_gpu`) that Axolotl 0.19 gets wrong
on a machine without an accelerator: the model loader's device map and unsharded processes."""

from __future__ import annotations

import os

import torch
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from transformers import Trainer

LOG = get_logger(__name__)


def cpu_device_map(cfg: DictDefault) -> None:
    """Let a multi-process run (torchrun, accelerate launch) load the model on CPU.

    With WORLD_SIZE > 1 Axolotl 0.19 always sets `device_map = {"": LOCAL_RANK}`; on a machine
    without an accelerator transformers then fails with "Cannot access accelerator device when
    none is available". The model loader already holds this dict, so it is edited in place.
    """
    device_map = cfg.device_map
    if torch.accelerator.is_available() or not isinstance(device_map, dict):
        return
    ranks = {key: value for key, value in device_map.items() if isinstance(value, int)}
    if ranks:
        device_map.update(dict.fromkeys(ranks, "cpu"))
        LOG.info(f"fish_mask: no accelerator, loading the model on CPU (device_map was {ranks})")


def check_every_process_is_a_rank(trainer: Trainer) -> None:
    """Refuse processes that would each train alone on all the data.

    Without an accelerator, accelerate treats processes started by torchrun or
    `accelerate launch --multi_gpu` as separate single-process runs unless ACCELERATE_USE_CPU is
    set: each would train on every example, and the Fisher pass would count each one per process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer.args.world_size:
        raise RuntimeError(
            f"fish_mask: {launched} processes were launched but the Trainer runs "
            f"{trainer.args.world_size} data-parallel rank(s), so each process would train alone "
            f"on all the data. On CPU, set ACCELERATE_USE_CPU=1: `ACCELERATE_USE_CPU=1 axolotl "
            f"train CONFIG --launcher accelerate -- --multi_gpu --num_processes {launched}`."
        )
