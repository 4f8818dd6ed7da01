"""FSDP2 on two CPU processes (gloo) through the real `axolotl train` CLI: LoRA (and DoRA, LoRA
on embeddings), bottleneck adapters and full-parameter mode.

accelerate and Axolotl turn FSDP on only for GPUs; the test-only `tests/fsdp_cpu_shim`
(a `sitecustomize` on the launched processes' PYTHONPATH) lets them take their FSDP2 path on CPU.
Everything else - Axolotl's FSDP2 wrapping, the Trainer, sharded (DCP) checkpoints, the final
gathered save, the plugin - is the code a GPU run executes. Checkpoints are sharded folders
written by both ranks, which is also how the tests see that the run really sharded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from axolotl_run import (
    SHARDED_HARSH,
    assert_masked_entries_equal,
    bottleneck_file,
    cpu_shim_env,
    held_digests,
    initial_bottleneck,
    load_adapter_tensors,
    moved_entries,
    run_axolotl,
    run_axolotl_train,
    two_process_launch,
    write_config,
)
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from axolotl_fish.base.ranks import mask_digest
from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.training.delta import DELTA_FILENAME, SparseDelta, apply_delta
from axolotl_fish.training.sparse import VALUES_SUFFIX

pytestmark = pytest.mark.e2e

RANK_FILES = {"__0_0.distcp", "__1_0.distcp"}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints: one DCP file per rank
        "final_state_dict_type": "FULL_STATE_DICT",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "reshard_after_forward": True,
    },
}
# Weight decay, clipping and accumulation: the settings under which masked entries could move.
# Data in file order, so the two ranks' 8 examples are one process's first 16.
TRAINING = SHARDED_HARSH
# lora_r 1 < 2 ranks: rank 1 holds an empty slice of every lora_A. k is below the lora_B count:
# lora_A scores are exactly 0 at initialisation, so only real (non-zero) Fisher scores rank
# entries; masked lora_B entries must stay exactly 0.
LORA = {
    **TRAINING,
    "lora_r": 1,
    "lora_alpha": 2,
    "fish_mask": {"keep_ratio": 0.3, "num_samples": 16},
}


def train_fsdp2(config: Path) -> str:
    return run_axolotl_train(
        config,
        cwd=config.parent,
        cli_args=two_process_launch(),
        env=cpu_shim_env("fsdp_cpu_shim", "FISH_TEST_FSDP_ON_CPU"),
    ).stdout


def sharded_weights(checkpoint: Path) -> Path:
    return checkpoint / "pytorch_model_fsdp_0"


def slices_by_rank_file(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{tensor key: {rank file: offset of the slice it stores}} of a sharded (DCP) checkpoint."""
    metadata = FileSystemReader(str(sharded_weights(checkpoint))).read_metadata()
    slices: dict[str, dict[str, tuple[int, ...]]] = {}
    for index, info in metadata.storage_data.items():
        key = index.fqn.removeprefix("model.")
        slices.setdefault(key, {})[info.relative_path] = tuple(index.offset)
    return slices


def gathered_weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded (DCP) checkpoint, keyed like the saved adapter/model."""
    target = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(sharded_weights(checkpoint)), str(target))
    return torch.load(target)["model"]


def assert_really_sharded(checkpoint: Path, mask: FishMask, split: str) -> None:
    """Both ranks wrote a file and every `split` tensor is two different slices, one per rank."""
    slices = slices_by_rank_file(checkpoint)
    assert set(slices) == set(mask.masks)
    assert {file for by_file in slices.values() for file in by_file} == RANK_FILES
    for key, by_file in slices.items():
        if split in key:
            assert set(by_file) == RANK_FILES, (checkpoint, key)
            assert by_file["__0_0.distcp"][0] == 0 < by_file["__1_0.distcp"][0], (checkpoint, key)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """Two steps under FSDP2, the mask scored on the sharded model; then a resume from
    checkpoint-2 to step 4 with another keep_ratio in the config (the checkpoint's mask must
    win); and the same mask computed by one process, on the whole model (`fish-mask compute` on
    the same FSDP2 config)."""
    tmp = tmp_path_factory.mktemp("fsdp2_lora")
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **LORA, **FSDP2, max_steps=2)
    first = train_fsdp2(config)
    checkpoint_2 = {
        key: t.clone() for key, t in gathered_weights(tmp / "out/checkpoint-2", tmp).items()
    }
    resume = {**LORA, "fish_mask": {"keep_ratio": 0.5, "num_samples": 16}}
    config = write_config(
        tmp,
        tiny_llama_dir,
        alpaca_jsonl,
        **resume,
        **FSDP2,
        max_steps=4,
        resume_from_checkpoint=str(tmp / "out/checkpoint-2"),
    )
    resumed = train_fsdp2(config)
    single_dir = tmp_path_factory.mktemp("single")
    single = write_config(single_dir, tiny_llama_dir, alpaca_jsonl, **LORA, **FSDP2)
    run_axolotl(
        ["fish-mask", "compute", str(single), "--output", str(single_dir / MASK_FILENAME)],
        single_dir,
    )
    return tmp, first, resumed, checkpoint_2, FishMask.load(single_dir)


def test_lora_run_really_sharded(lora_runs):
    tmp, first, _, _, _ = lora_runs
    mask = FishMask.load(tmp / "out")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert_really_sharded(tmp / "out" / checkpoint, mask, split="lora_B")
    assert "Saved FSDP2-gathered LoRA adapter" in first


def test_every_rank_holds_one_mask_and_the_scores_are_one_process_s(lora_runs):
    tmp, first, resumed, _, single = lora_runs
    mask = FishMask.load(tmp / "out")
    digest = mask_digest(mask.masks)
    assert held_digests(first) == held_digests(resumed) == {"0": digest, "1": digest}
    assert mask.metadata["world_size"] == 2 and mask.metadata["num_examples"] == 16
    assert "Fisher pass: 100%|██████████| 8/8" in first  # rank 0's share
    # Scored on the sharded model, once training started (the resume reads the saved mask).
    assert "computed when training starts, on the model FSDP2 has sharded" in first
    assert mask.k == round(0.3 * mask.total) == mask.metadata["k"]
    for key, keep in single.masks.items():
        assert torch.equal(mask.masks[key], keep), key
    # All-zero scores would tie everywhere: entries drawn at random, lora_A ones included.
    assert "tie_breaks" not in mask.metadata
    assert not any(keep.any() for key, keep in mask.masks.items() if "lora_A" in key)


def test_masked_entries_unchanged_in_every_checkpoint_and_the_final_adapter(lora_runs, tmp_path):
    tmp, _, _, checkpoint_2, _ = lora_runs
    out = tmp / "out"
    mask = FishMask.load(out)
    saved = {
        "checkpoint-2": checkpoint_2,
        "checkpoint-4": gathered_weights(out / "checkpoint-4", tmp_path),
        "final": load_adapter_tensors(out),
    }
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert (folder / MASK_FILENAME).is_file()  # beside the sharded folders, from rank 0
        assert mask_digest(FishMask.load(folder).masks) == mask_digest(mask.masks), folder
    for name, adapter in saved.items():
        assert set(adapter) == set(mask.masks), name
        for key, keep in mask.masks.items():
            if "lora_B" in key:  # starts at 0: exactly the k selected entries moved
                assert not adapter[key][~keep].any(), (name, key)
                assert adapter[key][keep].all(), (name, key)
            else:  # no entry selected: frozen
                assert torch.equal(adapter[key], checkpoint_2[key]), (name, key)


@pytest.fixture(scope="module")
def efficient_loading_runs(lora_runs, tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """`lora_runs`' two runs again with `cpu_ram_efficient_loading`: only rank 0 loads the
    weights (the other rank's base weights stay on the meta device, its adapter all zeros,
    until FSDP2 broadcasts rank 0's into its shards), so the mask can only be made after
    sharding; the resume reads the saved one."""
    tmp = tmp_path_factory.mktemp("fsdp2_efficient")
    fsdp_config = {**FSDP2["fsdp_config"], "cpu_ram_efficient_loading": True}
    fsdp = {**FSDP2, "fsdp_config": fsdp_config}
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **LORA, **fsdp, max_steps=2)
    first = train_fsdp2(config)
    checkpoint_2 = gathered_weights(tmp / "out/checkpoint-2", tmp)
    resume = {"max_steps": 4, "resume_from_checkpoint": str(tmp / "out/checkpoint-2")}
    config = write_config(tmp, tiny_llama_dir, alpaca_jsonl, **LORA, **fsdp, **resume)
    resumed = train_fsdp2(config)
    return tmp / "out", first, resumed, checkpoint_2


def test_rank_zero_only_loading_trains_as_the_fully_loaded_run(lora_runs, efficient_loading_runs):
    tmp, _, _, checkpoint_2, _ = lora_runs
    out, first, resumed, efficient_checkpoint_2 = efficient_loading_runs
    assert "non-rank-0 params stay on meta" in first  # Axolotl's rank-0-only loading was on
    assert "computed when training starts, on the model FSDP2 has sharded" in first
    assert f"resuming with the mask saved in {out / 'checkpoint-2' / MASK_FILENAME}" in resumed
    assert held_digests(first) == held_digests(resumed) == held_digests(lora_runs[1])
    mask = FishMask.load(out)
    assert mask_digest(mask.masks) == mask_digest(FishMask.load(tmp / "out").masks)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert_really_sharded(out / checkpoint, mask, split="lora_B")
    final, reference = load_adapter_tensors(out), load_adapter_tensors(tmp / "out")
    for key in mask.masks:
        torch.testing.assert_close(efficient_checkpoint_2[key], checkpoint_2[key], msg=key)
        torch.testing.assert_close(final[key], reference[key], msg=key)


# Adapters whose Fisher rules read parameter values, and the tensor that shows it was scored.
VALUE_READING = {
    "dora": ({"peft_use_dora": True}, "lora_magnitude_vector"),
    "lora embedding": (
        {"lora_target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        "lora_embedding_A",
    ),
    "dora embedding": (
        {"peft_use_dora": True, "lora_target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        "embed_tokens.lora_",
    ),
}


@pytest.mark.parametrize("adapter", VALUE_READING)
def test_value_reading_adapters_score_after_sharding_and_train_only_their_mask(
    adapter, tmp_path_factory, tiny_llama_dir, alpaca_jsonl
):
    """DoRA's magnitude rule and the LoRA and DoRA embedding rules read parameter values: on the
    sharded model (Axolotl makes each LoRA factor, magnitude and LoRA embedding layer an FSDP2
    group of its own) they read them while FSDP2 holds the group gathered for its backward (the
    DoRA embedding rule gathers its magnitude, a group of its own, itself)."""
    tmp = tmp_path_factory.mktemp(f"fsdp2_{adapter.replace(' ', '_')}")
    settings, scored = VALUE_READING[adapter]
    config = write_config(
        tmp, tiny_llama_dir, alpaca_jsonl, **LORA, **settings, **FSDP2, max_steps=4
    )
    log = train_fsdp2(config)
    assert "computed when training starts, on the model FSDP2 has sharded" in log
    out = tmp / "out"
    mask = FishMask.load(out)
    assert held_digests(log) == {"0": mask_digest(mask.masks), "1": mask_digest(mask.masks)}
    assert any(scored in key and keep.any() for key, keep in mask.masks.items())
    checkpoint_2 = gathered_weights(out / "checkpoint-2", tmp)
    final = load_adapter_tensors(out)
    moved = 0
    for key, keep in mask.masks.items():
        assert torch.equal(final[key][~keep], checkpoint_2[key][~keep]), key
        if "lora_B" in key:
            assert not final[key][~keep].any(), key
        moved += int((final[key][keep] != checkpoint_2[key][keep]).sum())
    assert moved > 0


def test_resume_keeps_the_checkpoint_s_mask(lora_runs):
    tmp, _, resumed, _, _ = lora_runs
    mask = FishMask.load(tmp / "out")
    assert f"resuming with the mask saved in {tmp / 'out/checkpoint-2' / MASK_FILENAME}" in resumed
    assert mask.metadata["keep_ratio"] == 0.3  # not the resumed config's 0.5


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """No adapter: every weight of the model is a candidate and is sharded. Four steps straight
    (checkpoints 2 and 4), and a resume from its checkpoint-2 to step 4 in another folder."""
    settings = {**TRAINING, **FSDP2, "adapter": None, "max_steps": 4}
    settings["fish_mask"] = {"keep_ratio": 0.05, "num_samples": 8}
    straight = tmp_path_factory.mktemp("fsdp2_full")
    config = write_config(straight, tiny_llama_dir, alpaca_jsonl, **settings)
    assert yaml.safe_load(config.read_text())["fsdp_version"] == 2
    log = train_fsdp2(config)
    resumed = tmp_path_factory.mktemp("fsdp2_full_resumed")
    checkpoint = str(straight / "out/checkpoint-2")
    config = write_config(
        resumed, tiny_llama_dir, alpaca_jsonl, **settings, resume_from_checkpoint=checkpoint
    )
    return straight / "out", log, resumed / "out", train_fsdp2(config)


def optimizer_state(checkpoint: Path, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: its AdamW state} of a sharded (DCP) checkpoint, gathered."""
    target = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}-optimizer.pt"
    dcp_to_torch_save(str(checkpoint / "optimizer_0"), str(target))
    return torch.load(target)["optimizer"]["state"]


def test_full_parameter_fsdp2_keeps_masked_weights_of_the_base_model(
    full_runs, tiny_llama_dir, tmp_path
):
    out, log, resumed, _ = full_runs
    mask = FishMask.load(out)
    base = load_file(tiny_llama_dir / "model.safetensors")
    digest = mask_digest(mask.masks)
    assert held_digests(log) == {"0": digest, "1": digest}
    assert mask.k == round(0.05 * mask.total) == mask.metadata["k"]
    assert mask.total == sum(t.numel() for t in base.values())
    assert_really_sharded(out / "checkpoint-2", mask, split="weight")
    saved = {
        "checkpoint-2": gathered_weights(out / "checkpoint-2", tmp_path),
        "checkpoint-4": gathered_weights(out / "checkpoint-4", tmp_path),
        "final": load_file(out / "model.safetensors"),
        "resumed final": load_file(resumed / "model.safetensors"),
    }
    assert mask_digest(FishMask.load(out / "checkpoint-2").masks) == digest
    for name, weights in saved.items():
        assert set(weights) == set(base), name
        for key, keep in mask.masks.items():
            assert torch.equal(weights[key][~keep], base[key][~keep]), (name, key)
        moved = sum(int((weights[k] != base[k])[m].sum()) for k, m in mask.masks.items())
        assert moved > 0.5 * mask.k, name


def test_full_parameter_fsdp2_keeps_optimizer_state_for_the_k_selected_entries_only(
    full_runs, tmp_path
):
    """Partly selected weights train as sharded value vectors: AdamW state for k entries."""
    out, log, _, _ = full_runs
    mask = FishMask.load(out)
    assert "the value vectors of the selected entries are sharded like the weights" in log
    state = optimizer_state(out / "checkpoint-2", tmp_path)
    partly = {key for key, keep in mask.masks.items() if keep.any() and not keep.all()}
    fully = {key for key, keep in mask.masks.items() if keep.all()}
    assert len(partly) > 5
    assert set(state) == {key + VALUES_SUFFIX for key in partly} | fully
    assert sum(entry["exp_avg"].numel() for entry in state.values()) == mask.k


def test_full_parameter_fsdp2_delta_rebuilds_the_trained_model_bitwise(
    full_runs, tiny_llama_dir, tmp_path
):
    """Every rank takes part in gathering the delta; rank 0 writes it beside each checkpoint."""
    out, _, _, _ = full_runs
    mask = FishMask.load(out)
    trained = {
        "checkpoint-2": gathered_weights(out / "checkpoint-2", tmp_path),
        "final": load_file(out / "model.safetensors"),
    }
    for name, folder in (("checkpoint-2", out / "checkpoint-2"), ("final", out)):
        delta = SparseDelta.load(folder)
        assert delta.metadata["k"] == mask.k - sum(
            int(m.sum()) for m in mask.masks.values() if m.all()
        )
        rebuilt = apply_delta(tiny_llama_dir, folder / DELTA_FILENAME, tmp_path / name)
        applied = load_file(rebuilt)
        assert set(applied) == set(trained[name]), name
        for key, weight in trained[name].items():
            assert torch.equal(applied[key], weight), (name, key)


def test_full_parameter_fsdp2_resume_continues_as_if_never_stopped(full_runs, tmp_path):
    """The resumed run loads the checkpoint's optimizer state into the value vectors (AdamW's
    step count goes on from 2) and its weights into them, and ends where the straight run did."""
    out, _, resumed, resumed_log = full_runs
    assert f"resuming with the mask saved in {out / 'checkpoint-2' / MASK_FILENAME}" in resumed_log
    steps = {
        entry["step"].item()
        for entry in optimizer_state(resumed / "checkpoint-4", tmp_path).values()
    }
    assert steps == {4}
    straight, again = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key, weight in straight.items():
        torch.testing.assert_close(again[key], weight, rtol=0, atol=1e-6, msg=key)


# Adapter-FISH as adapters.md shows it: size 4 masked to size 2's entries after a dense warm-up
# (at initialisation every down-projection scores exactly 0).
BOTTLENECK = {"adapter": "bottleneck", "bottleneck": {"size": 4}, "max_steps": 4}
BOTTLENECK_MASK = {"match_rank": 2, "num_samples": 8, "warmup_steps": 2}


@pytest.fixture(scope="module")
def bottleneck_runs(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """`adapter: bottleneck` with a warm-up under FSDP2: four steps with rank-0-only loading
    (checkpoints 2 and 4), so the warm-up and the pass can only run on the sharded model; and a
    resume from its checkpoint-2, fully loaded, in another folder. (That the sharded pass gives
    one process's mask is `test_sharded_scoring`'s: a warm-up on 2 ranks averages 2 processes'
    micro-batches, which one process does not.)"""
    settings = {**TRAINING, **BOTTLENECK, "fish_mask": BOTTLENECK_MASK}
    efficient = {**FSDP2["fsdp_config"], "cpu_ram_efficient_loading": True}
    straight = tmp_path_factory.mktemp("fsdp2_bottleneck")
    config = write_config(
        straight, tiny_llama_dir, alpaca_jsonl, **settings, **{**FSDP2, "fsdp_config": efficient}
    )
    log = train_fsdp2(config)
    resumed = tmp_path_factory.mktemp("fsdp2_bottleneck_resumed")
    checkpoint = str(straight / "out/checkpoint-2")
    config = write_config(
        resumed,
        tiny_llama_dir,
        alpaca_jsonl,
        **settings,
        **FSDP2,
        resume_from_checkpoint=checkpoint,
    )
    return straight / "out", log, resumed / "out", train_fsdp2(config)


def test_bottleneck_fsdp2_warms_up_and_scores_after_rank_zero_only_loading(bottleneck_runs):
    out, log, _, _ = bottleneck_runs
    assert "non-rank-0 params stay on meta" in log  # Axolotl's rank-0-only loading was on
    assert "computed when training starts, on the model FSDP2 has sharded" in log
    mask = FishMask.load(out)
    digest = mask_digest(mask.masks)
    assert held_digests(log) == {"0": digest, "1": digest}
    assert mask.k == 2 * (2 * 64 + 2 + 2 * 64 + 64) * 2  # size 2's entries: 2 layers, houlsby
    # The warm-up moved the up-projections: the down-projections got real scores (no ties).
    assert mask.metadata["warmup_steps"] == 2 and "tie_breaks" not in mask.metadata
    assert any(".down." in key and keep.any() for key, keep in mask.masks.items())


def test_bottleneck_fsdp2_saves_the_gathered_adapter_and_trains_only_the_mask(
    bottleneck_runs, tiny_llama_dir, tmp_path
):
    """Every rank gathers the sharded adapter and rank 0 writes it whole: beside each sharded
    checkpoint, equal to that checkpoint's tensors, and at the end. Unselected entries keep their
    initial values (the init is seeded: a fresh adapter on the base model), so the warm-up's
    steps were undone."""
    out, _, _, _ = bottleneck_runs
    mask = FishMask.load(out)
    initial = initial_bottleneck(tiny_llama_dir, **BOTTLENECK["bottleneck"])
    slices = slices_by_rank_file(out / "checkpoint-2")
    for key in mask.masks:
        if key.endswith("up.weight"):  # 64 rows: half on each rank
            assert set(slices[key]) == RANK_FILES, key
    for folder in ("checkpoint-2", "checkpoint-4"):
        sharded = gathered_weights(out / folder, tmp_path)
        saved = bottleneck_file(out / folder)
        assert set(saved) == set(mask.masks) == set(initial), folder
        for key in saved:
            assert torch.equal(saved[key], sharded[key]), (folder, key)
    assert_masked_entries_equal(mask, initial, [out / "checkpoint-2", out / "checkpoint-4", out])
    assert moved_entries(mask, bottleneck_file(out), initial) > 0


def test_bottleneck_fsdp2_resume_continues_as_if_never_stopped(bottleneck_runs):
    out, _, resumed, resumed_log = bottleneck_runs
    assert f"resuming with the mask saved in {out / 'checkpoint-2' / MASK_FILENAME}" in resumed_log
    straight, again = bottleneck_file(out), bottleneck_file(resumed)
    for key, tensor in straight.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=1e-6, msg=key)
