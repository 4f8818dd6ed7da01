"""The plugin's two fixes for multi-process launches without an accelerator (fast; the real
2-process run is test_ddp_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from axolotl.utils.dict import DictDefault

from axolotl_fish.integration.multiprocess import check_every_process_is_a_rank, cpu_device_map


@pytest.mark.skipif(torch.accelerator.is_available(), reason="maps ranks to CPU only without one")
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
