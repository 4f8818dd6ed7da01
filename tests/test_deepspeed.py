"""DeepSpeed ZeRO-1/2/3 on two CPU processes (gloo), `deepspeed.initialize` called directly: the
gradient masks and the fp32 master restore of `DeepSpeedFishMaskCallback`.

One spawn trains every configuration in turn (DeepSpeed's import is paid once): stages 1, 2 and 3
in fp32 and bf16, BF16_Optimizer, CPU optimizer offload, and two negative controls without the
master restore. A toy model whose flat layout is uneven: under ZeRO-1/2 rank 0's partition holds
part of `0.weight` only (no slice of `0.bias` or `2.weight`, both partly frozen), under ZeRO-3
every tensor is split with padding on rank 1. AdamW with weight decay, gradient accumulation and
clipping; the same masked training in one process without DeepSpeed is the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from axolotl_run import free_port
from torch import nn

from axolotl_fish import FishMask, FishMaskCallback
from axolotl_fish.distributed.deepspeed import (
    INTERNALS,
    DeepSpeedFishMaskCallback,
    check_deepspeed_config,
    check_internals,
    check_no_leaf_modules,
)

WORLD = 2
STEPS = 3
MICRO_STEPS = 2  # gradient accumulation
MAX_NORM = 0.05  # small enough that every step clips
RESUME_AT = 1  # `-resumed` runs: steps before the checkpoint
LR, WEIGHT_DECAY = 0.1, 0.1

# name: (zero_optimization, bf16, restore); every run also sets the rest of `ds_config`.
RUNS = {
    "zero1-fp32": ({"stage": 1}, False, True),
    "zero1-bf16": ({"stage": 1}, True, True),
    "zero1-bf16-BF16_Optimizer": ({"stage": 1}, True, True),
    "zero2-fp32": ({"stage": 2}, False, True),
    "zero2-bf16": ({"stage": 2}, True, True),
    "zero2-fp32-cpu-offload": ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, False, True),
    # Axolotl's zero3_bf16.json: sub_group_size 0 steps each tensor as its own sub-group.
    "zero3-fp32": ({"stage": 3, "sub_group_size": 0}, False, True),
    "zero3-bf16": ({"stage": 3, "sub_group_size": 0}, True, True),
    "zero2-fp32-resumed": ({"stage": 2}, False, True),
    "zero3-fp32-resumed": ({"stage": 3, "sub_group_size": 0}, False, True),
    "zero2-fp32-no-restore": ({"stage": 2}, False, False),
    "zero3-fp32-no-restore": ({"stage": 3}, False, False),
}
OPTIMIZER = {
    1: "DeepSpeedZeroOptimizer",
    2: "DeepSpeedZeroOptimizer",
    3: "DeepSpeedZeroOptimizer_Stage3",
}


def ds_config(zero: dict, bf16: bool, name: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": MICRO_STEPS,
        "gradient_clipping": MAX_NORM,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # a torch AdamW on CPU: no C++ build
        "steps_per_print": 10**9,
    }
    if name.endswith("BF16_Optimizer"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def toy_mask(model: nn.Module) -> FishMask:
    """About half the entries of each tensor; the last bias none (it stops requiring grad)."""
    generator = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(p.shape, generator=generator) < 0.5 for k, p in model.named_parameters()}
    masks["0.bias"] = torch.tensor([True, True, False])
    masks["2.weight"] = torch.tensor([[False, True, False]])
    masks["2.bias"][:] = False
    return FishMask(masks=masks, metadata={"k": 0})


def batch(rank: int, micro: int, step: int) -> torch.Tensor:
    return torch.randn(
        4, 5, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    )


def start(name: str, args: SimpleNamespace, state: SimpleNamespace, checkpoint: Path | None):
    """A fresh model, the plugin's callback and a DeepSpeed engine, as the Trainer sets them up
    (a resume loads `checkpoint` before training starts)."""
    import deepspeed

    zero, bf16, restore = RUNS[name]
    model = toy_model()
    # Before initialize, as the plugin does.
    callback = DeepSpeedFishMaskCallback(model, toy_mask(model), zero3=zero["stage"] == 3)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(zero, bf16, name)
    )
    if checkpoint is not None:
        engine.load_checkpoint(str(checkpoint), tag="resume")
    callback.on_train_begin(args, state, None, model=engine.module, optimizer=optimizer)
    if not restore:
        callback.restore.remove()
    return engine, callback


def train_deepspeed(name: str, out_dir: Path, rank: int) -> dict:
    """STEPS steps; a `-resumed` run saves a DeepSpeed checkpoint after RESUME_AT of them and
    continues in a fresh engine loaded from it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    args = SimpleNamespace(output_dir=str(out_dir / name))
    state = SimpleNamespace(is_world_process_zero=rank == 0)
    engine, callback = start(name, args, state, None)
    dtype = torch.bfloat16 if RUNS[name][1] else torch.float32
    norms = []
    for step in range(STEPS):
        if step == RESUME_AT and name.endswith("-resumed"):
            engine.save_checkpoint(str(out_dir / name / "checkpoint"), tag="resume")
            callback.on_train_end(args, state, None)
            engine.destroy()
            engine, callback = start(name, args, state, out_dir / name / "checkpoint")
        for micro in range(MICRO_STEPS):
            loss = engine(batch(rank, micro, step).to(dtype)).float().square().mean()
            engine.backward(loss)
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        callback.on_optimizer_step(None, None, None)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        working = {key: p.detach().clone() for key, p in params.items()}
    masters = {
        key: safe_get_full_fp32_param(p).clone() for key, p in params.items() if p.requires_grad
    }
    run = {
        "optimizer": type(engine.optimizer).__name__,
        "stage": engine.zero_optimization_stage(),
        "partitioned": {
            key: tuple(p.ds_tensor.shape) for key, p in params.items() if hasattr(p, "ds_tensor")
        },
        "restored": callback.restore.keys,
        "working": working,
        "masters": masters,
        "norms": norms,
    }
    callback.on_train_end(args, state, None)
    engine.destroy()
    return run


def worker(rank: int, port: int, out_dir: str) -> None:
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ build (inference op)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in env.items()}, MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        runs = {name: train_deepspeed(name, Path(out_dir), rank) for name in RUNS}
        torch.save(runs, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    """The same masked training in one process without DeepSpeed, on both ranks' batches."""
    model = toy_model()
    callback = FishMaskCallback(model, toy_mask(model), sparse=False)
    callback.on_train_begin(
        SimpleNamespace(output_dir=""), SimpleNamespace(is_world_process_zero=False), None
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY
    )
    norms = []
    for step in range(STEPS):
        for micro in range(MICRO_STEPS):
            losses = [model(batch(rank, micro, step)).square().mean() for rank in range(WORLD)]
            (sum(losses) / WORLD / MICRO_STEPS).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        callback.on_optimizer_step(None, None, None)
        optimizer.zero_grad()
    return {key: p.detach() for key, p in model.named_parameters()}, norms


def test_each_run_ran_deepspeed_at_its_stage(deepspeed_runs):
    _, ranks = deepspeed_runs
    for name, (zero, _, _) in RUNS.items():
        for run in ranks:
            kind = "BF16_Optimizer" if name.endswith("BF16_Optimizer") else OPTIMIZER[zero["stage"]]
            assert (run[name]["stage"], run[name]["optimizer"]) == (zero["stage"], kind), name
            assert bool(run[name]["partitioned"]) == (zero["stage"] == 3), name
            # ZeRO-3 keeps 2.bias (no entry selected) trainable so that saves keep it.
            assert ("2.bias" in run[name]["masters"]) == (zero["stage"] == 3), name
    # ZeRO-3: every tensor split in two, 0.weight's 15 entries as 8 and 7 plus a padding entry.
    assert [run["zero3-fp32"]["partitioned"]["0.weight"] for run in ranks] == [(8,), (8,)]


def test_uneven_partitions_and_a_rank_without_a_slice(deepspeed_runs):
    """ZeRO-1/2 split the flat 21 trainable entries 11 + 10 (+1 padding): rank 0 holds
    `0.weight[:11]` only, so it restores nothing else; ZeRO-3 splits every tensor, padding the
    last slice."""
    _, ranks = deepspeed_runs
    partly = ["0.weight", "0.bias", "2.weight"]
    for name in ("zero1-fp32", "zero2-bf16", "zero2-fp32-cpu-offload", "zero1-bf16-BF16_Optimizer"):
        assert [sorted(run[name]["restored"]) for run in ranks] == [["0.weight"], sorted(partly)], (
            name
        )
    # ZeRO-3: 0.bias splits [True, True] + [False, padding]: rank 0's slice has no frozen entry;
    # 2.bias (no entry selected, kept trainable and frozen whole) is rank 0's alone.
    expected = [["0.weight", "2.bias", "2.weight"], sorted(partly)]
    assert [sorted(run["zero3-bf16"]["restored"]) for run in ranks] == expected


@pytest.mark.parametrize("name", [name for name, (_, _, restore) in RUNS.items() if restore])
def test_frozen_entries_bitwise_unchanged_and_selected_ones_train_as_in_one_process(
    deepspeed_runs, one_process, name
):
    _, ranks = deepspeed_runs
    reference, norms = one_process
    _, bf16, _ = RUNS[name]
    initial = dict(toy_model().named_parameters())
    mask = toy_mask(toy_model())
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    for run in ranks:
        for key, keep in mask.masks.items():
            start = initial[key].detach()
            working, master = run[name]["working"][key], run[name]["masters"].get(key)
            assert torch.equal(working[~keep], start.to(working.dtype)[~keep]), key
            if master is not None:  # ZeRO-1/2: 2.bias (no entry selected) has no master
                assert torch.equal(master[~keep], start.to(working.dtype).float()[~keep]), key
                assert (master[keep] != start[keep]).all(), key
                torch.testing.assert_close(master, reference[key], **tolerance)
        torch.testing.assert_close(run[name]["norms"], norms, **tolerance)  # masked gradients
    assert all(norm > MAX_NORM for norm in norms)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resumed_run_ends_where_the_uninterrupted_run_ended(deepspeed_runs, stage):
    """The snapshot is taken after the checkpoint is loaded (masters and moments resumed)."""
    _, ranks = deepspeed_runs
    for run in ranks:
        straight, resumed = run[f"zero{stage}-fp32"], run[f"zero{stage}-fp32-resumed"]
        for key, value in straight["masters"].items():
            assert torch.equal(resumed["masters"][key], value), key
        for key, value in straight["working"].items():
            assert torch.equal(resumed["working"][key], value), key


@pytest.mark.parametrize("name", ["zero2-fp32-no-restore", "zero3-fp32-no-restore"])
def test_without_the_master_restore_weight_decay_moves_frozen_entries(deepspeed_runs, name):
    """The negative control: masked gradients alone leave frozen entries to weight decay."""
    _, ranks = deepspeed_runs
    initial = dict(toy_model().named_parameters())
    mask = toy_mask(toy_model())
    for run in ranks:
        master = run[name]["masters"]["0.weight"]
        frozen = ~mask.masks["0.weight"]
        moved = master[frozen] != initial["0.weight"].detach()[frozen]
        assert moved.all(), name


def test_the_restore_reads_deepspeed_internals_that_exist(deepspeed_runs):
    """A run under each optimizer kind restored its slices (so found every internal); a missing
    one is named."""
    _, ranks = deepspeed_runs
    assert all(ranks[1][name]["restored"] for name in RUNS)
    gone = SimpleNamespace(optimizer=None)  # a ZeRO-1/2 optimizer whose parameters lost it
    with pytest.raises(RuntimeError, match=r"parameter '0.weight'._hp_mapping"):
        check_internals(gone, {"0.weight": nn.Parameter(torch.zeros(1))})
    zero3 = SimpleNamespace(fp32_partitioned_groups_flat=[], optimizer=None)
    with pytest.raises(RuntimeError, match=r"SimpleNamespace.grad_position"):
        check_internals(zero3, {})
    assert INTERNALS["zero3"][0] == "grad_position"


@pytest.mark.parametrize(
    ("zero", "full_parameter", "refused"),
    [
        ({"stage": 0}, False, "stage 1, 2 or 3"),
        (
            {"stage": 3, "offload_param": {"device": "nvme"}},
            False,
            r"offload_param.device: nvme \(NVMe offload\)",
        ),
        ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, False, "NVMe offload"),
        ({"stage": 3, "zero_hpz_partition_size": 8}, False, r"hpZ"),
        ({"stage": 3, "mics_shard_size": 8}, False, "MiCS"),
        ({"stage": 3, "zero_quantized_gradients": True}, False, "ZeRO\\+\\+ quantization"),
        ({"stage": 3}, True, "adapters .* only"),
    ],
)
def test_untested_settings_are_refused_by_name(zero, full_parameter, refused):
    with pytest.raises(ValueError, match=refused):
        check_deepspeed_config({"zero_optimization": zero}, full_parameter=full_parameter)


def test_tested_settings_pass_and_give_the_stage():
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert check_deepspeed_config({"zero_optimization": offload}, full_parameter=True) == 2
    assert check_deepspeed_config({"zero_optimization": {"stage": 3}}, full_parameter=False) == 3


def test_zero3_leaf_modules_are_refused_by_name():
    model = toy_model()
    check_no_leaf_modules(model)
    model[2]._z3_leaf = True  # what deepspeed.utils.set_z3_leaf_modules sets
    with pytest.raises(ValueError, match="module '2' is a ZeRO-3 leaf module"):
        check_no_leaf_modules(model)
