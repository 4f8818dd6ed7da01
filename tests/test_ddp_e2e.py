"""Two processes on CPU (gloo) through the real `axolotl train` CLI: one mask, held by both ranks.

The launch command is the one the README gives for multi-process training on CPU:
`ACCELERATE_USE_CPU=1 axolotl train CONFIG --launcher accelerate -- --multi_gpu --num_processes 2`,
plus `--main_process_port` on a free port (`two_process_launch`).
"""

from __future__ import annotations

import pytest
import torch
from axolotl_run import (
    assert_masked_entries_equal,
    bottleneck_file,
    held_digests,
    initial_bottleneck,
    load_adapter_tensors,
    moved_entries,
    run_axolotl_train,
    two_process_launch,
    write_config,
)
from safetensors.torch import load_file

from axolotl_fish.base.ranks import mask_digest
from axolotl_fish.masks.file import FishMask
from axolotl_fish.training.delta import SparseDelta

pytestmark = pytest.mark.e2e

ON_CPU = {"ACCELERATE_USE_CPU": "1"}
# k below the lora_B count: the ranking among B entries is decided by real Fisher scores, and
# masked B entries must stay exactly 0 (their initial value) in every checkpoint. Data in file
# order (curriculum_sampling): the two ranks' first 8 examples are then one process's first 16.
SETTINGS = {
    "curriculum_sampling": True,
    "plugins": ["axolotl_fish.FishMaskPlugin"],
    "fish_mask": {"keep_ratio": 0.3, "num_samples": 16},
    "weight_decay": 0.1,
    "max_grad_norm": 0.5,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """The same config trained by 2 processes and by 1."""
    logs, outs = {}, {}
    for name, cli_args in (("ddp", two_process_launch()), ("single", ())):
        tmp = tmp_path_factory.mktemp(name)
        config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **SETTINGS)
        logs[name] = run_axolotl_train(config, cwd=tmp, cli_args=cli_args, env=ON_CPU).stdout
        outs[name] = tmp / "out"
    return outs, logs


def test_both_ranks_hold_the_saved_mask(runs):
    outs, logs = runs
    mask = FishMask.load(outs["ddp"])
    assert held_digests(logs["ddp"]) == {"0": mask_digest(mask.masks), "1": mask_digest(mask.masks)}
    assert mask.metadata["world_size"] == 2
    assert mask.k == round(0.3 * mask.total) == mask.metadata["k"]


def test_scores_combine_both_shards(runs):
    """Each rank reads 8 examples; the summed scores give the mask one process gets from 16."""
    outs, logs = runs
    ddp, single = FishMask.load(outs["ddp"]), FishMask.load(outs["single"])
    assert ddp.metadata["num_examples"] == single.metadata["num_examples"] == 16
    assert "Fisher pass: 100%|██████████| 8/8" in logs["ddp"]  # rank 0's share
    for key, keep in single.masks.items():
        assert torch.equal(ddp.masks[key], keep), key


def test_masked_entries_unchanged_in_every_checkpoint(runs):
    outs, _ = runs
    out = outs["ddp"]
    mask = FishMask.load(out)
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    for folder in folders:
        assert mask_digest(FishMask.load(folder).masks) == mask_digest(mask.masks)
    initial_a = load_adapter_tensors(outs["single"] / "checkpoint-2")  # same seed, A never trains
    for folder in folders:
        adapter = load_adapter_tensors(folder)
        for key, keep in mask.masks.items():
            if "lora_B" in key:
                assert not adapter[key][~keep].any(), (folder, key)
                assert adapter[key][keep].any(), (folder, key)
            else:
                assert not keep.any(), key
                assert torch.equal(adapter[key], initial_a[key]), (folder, key)


def test_processes_that_would_each_train_alone_are_refused(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """Without ACCELERATE_USE_CPU accelerate runs each CPU process as a separate job."""
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, **SETTINGS)
    with pytest.raises(AssertionError, match="2 processes were launched but the Trainer runs 1"):
        run_axolotl_train(config, cwd=tmp_path, cli_args=two_process_launch())


def test_full_parameter_mode_under_ddp(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """No adapter, 2 processes: sparse value vectors train under DDP; every saved model keeps the
    base's masked entries bitwise, and its fish_delta rebuilds it bit for bit."""
    settings = SETTINGS | {"adapter": None, "fish_mask": {"keep_ratio": 0.05, "num_samples": 8}}
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, **settings)
    log = run_axolotl_train(config, cwd=tmp_path, cli_args=two_process_launch(), env=ON_CPU).stdout
    held = held_digests(log)
    assert len(held) == 2 and len(set(held.values())) == 1
    out = tmp_path / "out"
    base = load_file(tiny_llama_dir / "model.safetensors")
    mask = FishMask.load(out)
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        saved = load_file(folder / "model.safetensors")
        for key, keep in mask.masks.items():
            assert torch.equal(saved[key][~keep], base[key][~keep]), (folder, key)
        rebuilt = SparseDelta.load(folder).apply(base)
        assert all(torch.equal(rebuilt[key], saved[key]) for key in saved), folder
    moved = sum(int((saved[k] != base[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0.5 * mask.k


def test_bottleneck_under_ddp(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """`adapter: bottleneck`, 2 processes: both ranks hold the saved mask, and every saved adapter
    keeps the unselected entries of the fresh (seeded) adapter. The core's INFO line about the
    adapters it built shows once (the first process's), not once per rank."""
    bottleneck = {"size": 4}
    settings = SETTINGS | {
        "adapter": "bottleneck",
        "bottleneck": bottleneck,
        "fish_mask": {"match_rank": 2, "num_samples": 16},
    }
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, **settings)
    log = run_axolotl_train(config, cwd=tmp_path, cli_args=two_process_launch(), env=ON_CPU).stdout
    out = tmp_path / "out"
    mask = FishMask.load(out)
    digest = mask_digest(mask.masks)
    assert held_digests(log) == {"0": digest, "1": digest}
    assert log.count("bottleneck: 4 houlsby adapters of size 4 (relu)") == 1
    initial = initial_bottleneck(tiny_llama_dir, **bottleneck)
    assert_masked_entries_equal(mask, initial, [out / "checkpoint-2", out / "checkpoint-4", out])
    assert moved_entries(mask, bottleneck_file(out), initial) > 0
