"""DeepSpeed ZeRO-1, 2 and 3 on two CPU processes (gloo) through the real `axolotl train` CLI,
with Axolotl's own `deepspeed_configs/zero1.json`, `zero2.json` (CPU optimizer offload) and
`zero3_bf16.json`: LoRA at ZeRO-2 and ZeRO-3, DoRA at ZeRO-1, Adapter-FISH (bottleneck) at ZeRO-2.

accelerate turns DeepSpeed on only off CPU; the test-only `tests/deepspeed_cpu_shim` (a
`sitecustomize` on the launched processes' PYTHONPATH) lets it take its DeepSpeed path on CPU
and skips DeepSpeed's JIT-built inference op. The configs have no `optimizer:` section (that
would JIT-build FusedAdam); zero2's offload steps a torch AdamW on CPU
(`zero_force_ds_cpu_optimizer: false`) instead of the JIT-built DeepSpeedCPUAdam. Everything else
- Axolotl's `zero.Init` load under ZeRO-3, DeepSpeedEngine, the Trainer's DeepSpeed checkpoints
and resume, the final gathered save, the plugin - is what a GPU run executes. Each run proves its
stage from the checkpoint DeepSpeed wrote: one optimizer-state file per rank holding the stage,
and under ZeRO-3 one model-state file per rank (partitioned parameters).
The ZeRO-2 run is resumed; the ZeRO-3 one cannot be (see `RESUMED_STAGES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from axolotl_run import (
    SHARDED_HARSH,
    bottleneck_file,
    cpu_shim_env,
    held_digests,
    initial_bottleneck,
    load_adapter_tensors,
    moved_entries,
    run_axolotl_train,
    two_process_launch,
    write_config,
)

from axolotl_fish.base.ranks import mask_digest
from axolotl_fish.masks.file import FishMask

pytestmark = pytest.mark.e2e
deepspeed = pytest.importorskip("deepspeed", reason="the `deepspeed` extra")

AUTO = {
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
FP16 = {
    "enabled": "auto",
    "auto_cast": False,
    "loss_scale": 0,
    "initial_scale_power": 32,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# Axolotl's deepspeed_configs/zero1.json, zero2.json and zero3_bf16.json (no optimizer section).
ZERO1 = {
    "zero_optimization": {"stage": 1, "overlap_comm": True},
    "bf16": {"enabled": "auto"},
    "fp16": FP16,
    **AUTO,
}
ZERO2 = {
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu"},
        "contiguous_gradients": True,
        "overlap_comm": True,
    },
    "bf16": {"enabled": "auto"},
    "fp16": FP16,
    **AUTO,
    "zero_force_ds_cpu_optimizer": False,  # added: a torch AdamW on CPU, no C++ build
}
# zero3_bf16.json with the `stage3_` key names accelerate 1.13 fills "auto" into (Axolotl's
# newer copy names them `prefetch_bucket_size`, ...: accelerate then stops on the unfilled "auto").
ZERO3_BF16 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 0,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": True},
    **AUTO,
}
STAGES = {1: (ZERO1, {}), 2: (ZERO2, {}), 3: (ZERO3_BF16, {"bf16": True})}
# Weight decay, clipping and accumulation: the settings under which masked entries could move.
# Data in file order, so the two ranks' examples are one process's. k is below the lora_B count:
# lora_A scores are exactly 0 at initialisation, so masked lora_B entries must stay exactly 0.
TRAINING = {
    **SHARDED_HARSH,
    "max_steps": 4,
    "lora_r": 2,
    "lora_alpha": 4,
    "fish_mask": {"keep_ratio": 0.3, "num_samples": 16},
}


def train(tmp: Path, base: Path, data: Path, stage: int, **overrides) -> str:
    ds_config, settings = STAGES[stage]
    ds_path = tmp / "deepspeed.json"
    ds_path.write_text(json.dumps(ds_config))
    settings = {**TRAINING, **settings, "deepspeed": str(ds_path), **overrides}
    config = write_config(tmp, base, data, **settings)
    return run_axolotl_train(
        config,
        cwd=tmp,
        cli_args=two_process_launch(),
        env=cpu_shim_env("deepspeed_cpu_shim", "FISH_TEST_DEEPSPEED_ON_CPU"),
        timeout=600,
    ).stdout


# Resuming this ZeRO-3 run through `axolotl train` stops in DeepSpeed's parameter prefetch trace
# ("tracing error at step 63") with or without the plugin (plain LoRA, same config): not a
# plugin path, so only the ZeRO-2 run is resumed.
RESUMED_STAGES = (2,)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2-offload", "zero3-bf16"])
def runs(request, tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """Four steps (checkpoints at 2 and 4); under ZeRO-2 then the same run resumed from
    checkpoint-2 with another keep_ratio in the config (the checkpoint's mask must win)."""
    stage = request.param
    first_dir = tmp_path_factory.mktemp(f"zero{stage}")
    first = train(first_dir, tiny_llama_dir, alpaca_jsonl, stage)
    if stage not in RESUMED_STAGES:
        return stage, first_dir / "out", first, None, None
    resumed_dir = tmp_path_factory.mktemp(f"zero{stage}-resumed")
    resumed = train(
        resumed_dir,
        tiny_llama_dir,
        alpaca_jsonl,
        stage,
        fish_mask={"keep_ratio": 0.5, "num_samples": 16},
        resume_from_checkpoint=str(first_dir / "out/checkpoint-2"),
    )
    return stage, first_dir / "out", first, resumed_dir / "out", resumed


def rank_files(checkpoint: Path) -> dict[str, Path]:
    """DeepSpeed's files in a Trainer checkpoint (`global_stepN/`), by name."""
    (tag,) = checkpoint.glob("global_step*")
    return {path.name: path for path in tag.iterdir()}


def assert_ran_deepspeed(checkpoint: Path, stage: int) -> None:
    """DeepSpeed at `stage` over two ranks wrote `checkpoint`: each rank's optimizer state holds
    the stage and a partition count of 2; under ZeRO-3 each rank also saved its model slice."""
    files = rank_files(checkpoint)
    prefix = "bf16_" if stage == 3 else ""  # DeepSpeed names bf16 optimizer states so
    for rank in (0, 1):
        optim = files[f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        state = torch.load(optim, weights_only=False)["optimizer_state_dict"]
        assert state["zero_stage"] == stage, checkpoint
        count = state["partition_count"]  # a list of one per group under ZeRO-1/2
        assert set(count if isinstance(count, list) else [count]) == {2}, checkpoint
    partitioned = {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)}
    assert partitioned <= set(files) if stage == 3 else "mp_rank_00_model_states.pt" in files


def fp32_masters(checkpoint: Path, keys) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 masters in `checkpoint`, gathered (`zero_to_fp32`), for the mask's
    `keys` (PEFT's names lose the adapter name; a DoRA magnitude's also its `.weight`)."""
    masters = deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    named = {}
    for name, tensor in masters.items():
        key = name.replace(".default", "")
        key = key if key in keys else key.removesuffix(".weight")
        if key in keys:
            named[key] = tensor
    return named


def test_each_run_ran_deepspeed_at_its_stage_on_two_ranks(runs):
    stage, out, _, resumed_out, _ = runs
    checkpoints = [out / "checkpoint-2", out / "checkpoint-4"]
    if resumed_out is not None:
        checkpoints.append(resumed_out / "checkpoint-4")
    for checkpoint in checkpoints:
        assert_ran_deepspeed(checkpoint, stage)


def test_every_rank_holds_one_mask_and_the_resume_keeps_it(runs):
    stage, out, first, resumed_out, resumed = runs
    mask = FishMask.load(out)
    digest = mask_digest(mask.masks)
    assert held_digests(first) == {"0": digest, "1": digest}
    assert mask.k == round(0.3 * mask.total) and mask.metadata["world_size"] == 2
    # Under ZeRO-3 Axolotl loaded the model under zero.Init: the pass ran on the gathered model.
    assert ("ZeRO-3 partitioned the model at load (zero.Init)" in first) == (stage == 3)
    for folder in (out / "checkpoint-2", out / "checkpoint-4"):
        assert mask_digest(FishMask.load(folder).masks) == digest, folder
    if resumed is not None:
        assert held_digests(resumed) == {"0": digest, "1": digest}
        assert "resuming with the mask saved in" in resumed
        assert mask_digest(FishMask.load(resumed_out).masks) == digest


def test_masked_entries_unchanged_in_every_checkpoint_masters_and_final_adapter(runs):
    stage, out, _, _, _ = runs
    mask = FishMask.load(out)
    start = load_adapter_tensors(out / "checkpoint-2")
    saved = {name: load_adapter_tensors(out / name) for name in ("checkpoint-2", "checkpoint-4")}
    saved["final"] = load_adapter_tensors(out)
    for name in ("checkpoint-2", "checkpoint-4"):  # DeepSpeed's fp32 masters, gathered
        saved[f"{name} fp32 masters"] = fp32_masters(out / name, mask.masks)
    for name, adapter in saved.items():
        # Under ZeRO-2 lora_A (no entry selected) stops requiring gradients and has no master;
        # under ZeRO-3 it keeps requiring them (frozen whole), or the Trainer's saves drop it.
        trained = {key for key, keep in mask.masks.items() if keep.any()}
        whole = stage == 3 or "masters" not in name
        assert set(adapter) == (set(mask.masks) if whole else trained), name
        for key in adapter:
            keep = mask.masks[key]
            if "lora_B" in key:  # starts at 0: exactly the k selected entries moved
                assert not adapter[key][~keep].any(), (name, key)
                assert adapter[key][keep].all(), (name, key)
            else:  # no entry selected: frozen
                assert not keep.any()
                assert torch.equal(adapter[key].float(), start[key].float()), (name, key)


def test_resumed_run_ends_where_the_uninterrupted_run_ended(runs):
    stage, out, _, resumed_out, _ = runs
    if resumed_out is None:
        pytest.skip(f"ZeRO-{stage} resume fails in DeepSpeed without the plugin too (see above)")
    final, resumed = load_adapter_tensors(out), load_adapter_tensors(resumed_out)
    assert set(final) == set(resumed)
    for key in final:
        assert torch.equal(final[key], resumed[key]), key


# DoRA (magnitudes and factors) and Adapter-FISH (bottleneck, size 8 masked to size 4's entries)
# at the stages they are supported at besides LoRA's: (stage, config keys).
VARIANTS = {
    "dora-zero1": (1, {"peft_use_dora": True}),
    "bottleneck-zero2-offload": (
        2,
        {
            "adapter": "bottleneck",
            "bottleneck": {"size": 8, "nonlinearity": "gelu"},
            "fish_mask": {"match_rank": 4, "num_samples": 16},
        },
    ),
}
HIDDEN, LAYERS = 64, 2  # the tiny models of axolotl_run


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_run(request, tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    stage, overrides = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    log = train(tmp, tiny_llama_dir, alpaca_jsonl, stage, **overrides)
    return stage, overrides, tmp / "out", log


def test_dora_and_bottleneck_train_exactly_k_entries_under_deepspeed(variant_run, tiny_llama_dir):
    """Stage proven by the checkpoints, the same mask on both ranks and in every folder, exact k,
    and every masked entry unchanged in the saved adapters and DeepSpeed's fp32 masters."""
    stage, overrides, out, log = variant_run
    for checkpoint in (out / "checkpoint-2", out / "checkpoint-4"):
        assert_ran_deepspeed(checkpoint, stage)
    mask = FishMask.load(out)
    digest = mask_digest(mask.masks)
    assert held_digests(log) == {"0": digest, "1": digest}
    for folder in (out / "checkpoint-2", out / "checkpoint-4"):
        assert mask_digest(FishMask.load(folder).masks) == digest, folder
    bottleneck = overrides.get("adapter") == "bottleneck"
    load = bottleneck_file if bottleneck else load_adapter_tensors
    saved = {name: load(out / name) for name in ("checkpoint-2", "checkpoint-4")}
    saved["final"] = load(out)
    if bottleneck:
        initial = initial_bottleneck(tiny_llama_dir, **overrides["bottleneck"])
        assert mask.k == LAYERS * 2 * (4 * HIDDEN + 4 + HIDDEN * 4 + HIDDEN)  # dense size 4
    else:
        initial = None  # DoRA: lora_B starts at 0; the rest is compared with checkpoint-2
        assert mask.k == round(0.3 * mask.total)
        assert any("lora_magnitude_vector" in key for key, keep in mask.masks.items() if keep.any())
    reference = saved["checkpoint-2"] if initial is None else initial
    for name in ("checkpoint-2", "checkpoint-4"):
        saved[f"{name} fp32 masters"] = fp32_masters(out / name, mask.masks)
        assert saved[f"{name} fp32 masters"], name
    for name, tensors in saved.items():
        assert set(tensors) <= set(mask.masks), name
        for key, tensor in tensors.items():
            frozen = ~mask.masks[key]
            if "lora_B" in key:
                assert not tensor[frozen].any(), (name, key)
            else:
                assert torch.equal(tensor[frozen], reference[key][frozen].to(tensor.dtype)), (
                    name,
                    key,
                )
    moved = moved_entries(mask, saved["final"], reference)
    assert moved > (0.5 * mask.k if initial is not None else 0), moved
