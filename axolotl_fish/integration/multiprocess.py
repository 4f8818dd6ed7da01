"""Multi-process launches (torchrun, `accelerate launch --multi_gpu`) that Axolotl (0.19 to 0.21)
gets wrong on a machine without an accelerator: its GPU peer check, the model loader's device map
and unsharded processes."""

from __future__ import annotations

import os

import axolotl.utils.trainer
import torch
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from transformers import Trainer

LOG = get_logger(__name__)


def skip_gpu_peer_check() -> None:
    """Let a multi-process run start without an accelerator under a CUDA build of torch.

    Before the model loads, Axolotl asks torch whether GPU pairs reach each other
    (`axolotl.utils.trainer.check_cuda_p2p_ib_support`, to decide on NCCL_P2P_DISABLE). A CPU
    build of torch raises AssertionError there, which Axolotl takes as "cannot check"; a CUDA
    build on a machine without an NVIDIA driver (PyPI's Linux wheels, the only ones for Python
    3.12) raises RuntimeError, which stops every rank. Without an accelerator there are no GPU
    peers and no NCCL: the check is replaced by one that reports nothing to disable.
    """
    if not torch.accelerator.is_available():
        axolotl.utils.trainer.check_cuda_p2p_ib_support = _no_gpu_peers_to_check


def _no_gpu_peers_to_check() -> bool:
    return True


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
