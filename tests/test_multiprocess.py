"""The plugin's fixes for multi-process launches without an accelerator (fast; the real
2-process run is test_ddp_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

import axolotl.utils.environment
import axolotl.utils.trainer
import pytest
import torch
from axolotl.utils.dict import DictDefault

from axolotl_fish import FishMaskPlugin
from axolotl_fish.integration.multiprocess import check_every_process_is_a_rank, cpu_device_map

NO_ACCELERATOR = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="acts only without an accelerator"
)


def _no_driver(device: int, peer_device: int) -> bool:
    raise RuntimeError("Found no NVIDIA driver on your system.")


@NO_ACCELERATOR
def test_gpu_peer_check_of_a_cuda_torch_without_driver_is_skipped(monkeypatch):
    """A CUDA build of torch (PyPI's, Python 3.12) on a machine without a driver: Axolotl's peer
    check, which every multi-process `axolotl train` runs before loading the model, raises; once
    the plugin has registered it does not."""
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", _no_driver)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    # Axolotl's own check (an earlier register() in this process may have replaced it), restored
    # after the test.
    original = axolotl.utils.environment.check_cuda_p2p_ib_support
    monkeypatch.setattr(axolotl.utils.trainer, "check_cuda_p2p_ib_support", original)
    with pytest.raises(RuntimeError, match="no NVIDIA driver"):
        axolotl.utils.trainer.check_cuda_p2p_ib_support()
    FishMaskPlugin().register({"fish_mask": {"keep_ratio": 0.5}})
    assert axolotl.utils.trainer.check_cuda_p2p_ib_support() is True


@NO_ACCELERATOR
def test_rank_device_map_is_edited_in_place_to_cpu():
    device_map = {"": 1}
    cfg = DictDefault()
    cfg.device_map = device_map  # as Axolotl's normalize_config sets it
    cpu_device_map(cfg)
    assert device_map == {"": "cpu"}  # the model loader holds this very dict
    for unchanged in ("auto", {"": "cpu"}, None):
        cfg = DictDefault(device_map=unchanged)
        cpu_device_map(cfg)
        assert cfg.device_map == unchanged


def test_processes_the_trainer_does_not_shard_are_refused(monkeypatch):
    trainer = SimpleNamespace(args=SimpleNamespace(world_size=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but the Trainer runs 1"):
        check_every_process_is_a_rank(trainer)
    trainer.args.world_size = 2
    check_every_process_is_a_rank(trainer)
    monkeypatch.delenv("WORLD_SIZE")
    trainer.args.world_size = 1
    check_every_process_is_a_rank(trainer)
