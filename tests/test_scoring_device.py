"""The Fisher pass runs on the training device even where Axolotl left the model on CPU (FSDP).

No accelerator here: `model.to` is recorded instead of run, and the device is only named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from axolotl_fish.integration.scoring_device import on_training_device

GPU = torch.device("cuda", 0)


@pytest.fixture
def moves(monkeypatch):
    model = nn.Linear(2, 2)
    calls: list[str] = []
    monkeypatch.setattr(model, "to", lambda device: calls.append(str(device)) or model)
    return model, calls


def test_a_model_on_cpu_goes_to_the_accelerator_for_the_pass_and_comes_back(moves):
    model, calls = moves
    with on_training_device(model, GPU):
        assert calls == ["cuda:0"]
    assert calls == ["cuda:0", "cpu"]


def test_nothing_moves_when_training_runs_on_cpu(moves):
    model, calls = moves
    with on_training_device(model, torch.device("cpu")):
        pass
    assert calls == []


def test_running_out_of_device_memory_says_how_to_compute_the_mask_elsewhere(moves):
    model, calls = moves
    expected = r"needs the whole model on one device.*mask_path"
    with pytest.raises(RuntimeError, match=expected), on_training_device(model, GPU):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert calls == ["cuda:0", "cpu"]  # back where FSDP2 expects it
