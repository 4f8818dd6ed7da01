"""Two CPU processes (gloo): scores summed over ranks, identical masks on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from axolotl_run import free_port
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish import FishMask, FishMaskCallback, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.base.ranks import check_identical_across_ranks
from axolotl_fish.fisher.scores import fisher_scores

WORLD = 2
STRATEGIES = ("fisher", "random", "reverse")


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        shard = padded_batches(16, 4)[rank::WORLD]  # as a distributed sampler would split it
        model = tiny_lora_model("llama")
        scores = fisher_scores(model, shard, adapter_parameters(model), 16, progress=False)
        torch.save(
            {"scores": scores.scores, "n": scores.num_examples}, f"{out_dir}/scores{rank}.pt"
        )
        for strategy in STRATEGIES:
            config = FishMaskConfig(keep_ratio=0.3, num_samples=16, strategy=strategy, seed=11)
            mask = compute_fish_mask(model, shard, config, progress=False)
            FishMaskCallback(tiny_lora_model("llama"), mask)  # checks the digest across ranks
            mask.save(f"{out_dir}/{strategy}{rank}.safetensors")
        if rank == 1:
            first = next(iter(mask.masks))
            mask.masks[first] = ~mask.masks[first]
        try:
            check_identical_across_ranks(mask.masks)
        except RuntimeError as err:
            Path(out_dir, f"mismatch{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_scores_equal_one_process_scoring_all_examples(rank_outputs):
    model = tiny_lora_model("llama")
    single = fisher_scores(
        model, padded_batches(16, 4), adapter_parameters(model), 16, progress=False
    )
    for rank in range(WORLD):
        result = torch.load(rank_outputs / f"scores{rank}.pt")
        assert result["n"] == 16
        for key, score in single.scores.items():
            torch.testing.assert_close(result["scores"][key], score, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_rank_holds_the_same_mask(rank_outputs, strategy):
    masks = [FishMask.load(rank_outputs / f"{strategy}{rank}.safetensors") for rank in range(WORLD)]
    assert masks[0].k == masks[1].k == round(0.3 * masks[0].total)
    for key, mask in masks[0].masks.items():
        assert torch.equal(masks[1].masks[key], mask), key


def test_a_differing_mask_stops_every_rank(rank_outputs):
    for rank in range(WORLD):
        message = (rank_outputs / f"mismatch{rank}.txt").read_text()
        assert "ranks [1] disagree with rank 0" in message
