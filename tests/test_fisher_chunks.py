"""The Fisher pass in chunks of tensors: the same scores and the same mask as one pass, from data
that can be read only once, with each chunk's scores moved off the model's device."""

from __future__ import annotations

import pytest
import torch
from test_fisher import max_relative_error
from tiny_peft import padded_batches, tiny_base_model

import axolotl_fish.fisher.chunks as fisher_chunks
from axolotl_fish import FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import trainable_parameters
from axolotl_fish.fisher.chunks import fisher_scores_in_chunks, tensor_chunks
from axolotl_fish.fisher.scores import fisher_scores


@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 1000])
def test_chunks_keep_order_cover_every_tensor_and_share_the_entries(chunks):
    params = trainable_parameters(tiny_base_model("llama"))
    groups = tensor_chunks(params, chunks)
    assert [key for group in groups for key in group] == list(params)
    assert 1 <= len(groups) <= min(chunks, len(params)) and all(groups)
    if chunks in (2, 3):  # no tensor of the tiny model is a third of it: every group is used
        sizes = [sum(p.numel() for p in group.values()) for group in groups]
        total = sum(sizes)
        biggest = max(p.numel() for p in params.values())
        assert len(groups) == chunks
        assert all(abs(size - total / chunks) <= biggest for size in sizes)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scores_equal_one_pass_from_data_read_once(arch):
    model = tiny_base_model(arch)
    params = trainable_parameters(model)
    batches = padded_batches(n_rows=7, batch_size=3)
    whole = fisher_scores(model, batches, params, num_samples=5, progress=False)
    once = (batch for batch in batches)  # a second read would find nothing
    chunked = fisher_scores_in_chunks(model, once, params, 5, chunks=3, progress=False)
    assert list(chunked.scores) == list(params)
    assert chunked.num_examples == whole.num_examples == 5
    assert max_relative_error(chunked.scores, whole.scores) < 1e-6
    assert all(score.device.type == "cpu" for score in chunked.scores.values())


def test_every_chunk_is_scored_by_its_own_pass(monkeypatch):
    model = tiny_base_model("llama")
    params = trainable_parameters(model)
    passes: list[set[str]] = []
    original = fisher_chunks.fisher_scores

    def spy(model, batches, group, *args, **kwargs):
        passes.append(set(group))
        return original(model, batches, group, *args, **kwargs)

    monkeypatch.setattr(fisher_chunks, "fisher_scores", spy)
    fisher_scores_in_chunks(model, padded_batches(4, 2), params, 4, chunks=4, progress=False)
    assert len(passes) == 4 and set().union(*passes) == set(params)
    assert sum(len(keys) for keys in passes) == len(params)  # disjoint


def test_config_fisher_chunks_gives_the_same_mask_and_is_recorded():
    model = tiny_base_model("llama")
    batches = padded_batches(6, 3)
    masks, metadata = [], []
    for chunks in (1, 3):
        config = FishMaskConfig(keep_ratio=0.05, num_samples=6, fisher_chunks=chunks)
        mask = compute_fish_mask(model, batches, config, progress=False)
        masks.append(mask.masks)
        metadata.append(mask.metadata)
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][key], masks[1][key]) for key in masks[0])
    assert "fisher_chunks" not in metadata[0] and metadata[1]["fisher_chunks"] == 3
    with pytest.raises(ValueError, match="fisher_chunks"):
        FishMaskConfig(keep_ratio=0.05, fisher_chunks=0)
