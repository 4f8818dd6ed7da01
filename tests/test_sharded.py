"""FSDP2 (`fully_shard`) on two CPU processes (gloo): the callback follows the sharded parameters.

A toy model whose first dimensions (3 and 1) do not divide by 2: uneven shards, and rank 1 holds
an empty slice of the last layer. It trains with AdamW weight decay, gradient accumulation and
clipping; the same masked training in one process is the reference.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from axolotl_run import free_port
from tiny_peft import padded_batches, tiny_base_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from axolotl_fish import FishMask, FishMaskCallback, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import trainable_parameters
from axolotl_fish.base.sharded import flat_range, local_mask, parameters_by_name
from axolotl_fish.masks.file import MASK_FILENAME
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores
from axolotl_fish.training.delta import DELTA_FILENAME, SparseDelta
from axolotl_fish.training.sparse import VALUES_SUFFIX

WORLD = 2
STEPS = 3
MICRO_STEPS = 2  # gradient accumulation
MAX_NORM = 0.05  # small enough that every step clips


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def toy_mask(model: nn.Module) -> FishMask:
    """Half the entries of each tensor; the first bias all (it trains densely), the last bias
    none (it stops requiring grad)."""
    generator = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(p.shape, generator=generator) < 0.5 for k, p in model.named_parameters()}
    masks["0.bias"][:] = True
    masks["2.bias"][:] = False
    return FishMask(masks=masks, metadata={"k": 0})


def batch(rank: int, micro: int, step: int) -> torch.Tensor:
    return torch.randn(
        4, 5, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    )


def train(model: nn.Module, callback: FishMaskCallback, ranks: list[int], sync):
    """AdamW with weight decay over STEPS steps of MICRO_STEPS micro-batches; the optimizer and
    the clip norms."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1
    )
    norms = []
    for step in range(STEPS):
        for micro in range(MICRO_STEPS):
            sync(micro == MICRO_STEPS - 1)
            loss = sum(model(batch(rank, micro, step)).square().mean() for rank in ranks)
            (loss / len(ranks)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        callback.on_optimizer_step(None, None, None)
        optimizer.zero_grad()
    return optimizer, norms


def worker(rank: int, port: int, out_dir: str, sparse: bool) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = toy_model()
        mask = toy_mask(model)
        # Before wrapping, as the plugin does: value vectors (sparse) or dense masked training.
        callback = FishMaskCallback(model, mask, sparse=sparse)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = SimpleNamespace(is_world_process_zero=rank == 0)
        callback.on_train_begin(SimpleNamespace(output_dir=out_dir), state, None, model=model)
        holds_mask = callback.mask is not None
        params = dict(model.named_parameters())
        local = {
            key: {
                "type": type(p).__name__,
                "shape": tuple(p.to_local().shape),
                "mask": local_mask(mask.masks[key], p).shape == p.to_local().shape,
                "requires_grad": p.requires_grad,
            }
            for key, p in params.items()
            if key in mask.masks
        }
        values = {key: p for key, p in params.items() if key.endswith(VALUES_SUFFIX)}
        optimizer, norms = train(model, callback, [rank], model.set_requires_gradient_sync)
        values = {key: (type(p).__name__, tuple(p.to_local().shape)) for key, p in values.items()}
        state = sum(state["exp_avg"].to_local().numel() for state in optimizer.state.values())
        try:
            compute_fish_mask(model, [], FishMaskConfig(keep_ratio=0.5), progress=False)
        except ValueError as err:
            Path(out_dir, f"refused{rank}.txt").write_text(str(err))
        try:
            flat_range(distribute_tensor(torch.zeros(2, 4), mesh, [Shard(1)]))
        except ValueError as err:
            Path(out_dir, f"columns{rank}.txt").write_text(str(err))
        final = {key: params[key].full_tensor() for key in mask.masks}
        Path(out_dir, f"checkpoint-{STEPS}").mkdir(exist_ok=True)  # the Trainer's checkpoint
        saving = SimpleNamespace(is_world_process_zero=rank == 0, global_step=STEPS)
        callback.on_save(SimpleNamespace(output_dir=out_dir), saving, None)  # every rank
        run = {"local": local, "values": values, "state": state, "norms": norms, "final": final}
        run["holds_mask"] = holds_mask
        torch.save(run, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[False, True], ids=["dense-masked", "value-vectors"])
def sharded_runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(worker, args=(free_port(), str(out), request.param), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    """The same masked training in one process, on both ranks' batches."""
    model = toy_model()
    callback = FishMaskCallback(model, toy_mask(model), sparse=False)
    not_main = SimpleNamespace(is_world_process_zero=False)  # writes no mask file
    callback.on_train_begin(SimpleNamespace(output_dir=""), not_main, None)
    _, norms = train(model, callback, list(range(WORLD)), lambda sync: None)
    return dict(model.named_parameters()), norms


def test_parameters_were_sharded_unevenly_with_an_empty_slice(sharded_runs):
    _, ranks = sharded_runs
    shapes = [{key: info["shape"] for key, info in run["local"].items()} for run in ranks]
    assert all(info["type"] == "DTensor" for run in ranks for info in run["local"].values())
    assert shapes[0] == {"0.weight": (2, 5), "0.bias": (2,), "2.weight": (1, 3), "2.bias": (1,)}
    assert shapes[1] == {"0.weight": (1, 5), "0.bias": (1,), "2.weight": (0, 3), "2.bias": (0,)}
    assert all(info["mask"] for run in ranks for info in run["local"].values())
    assert [run["local"]["2.bias"]["requires_grad"] for run in ranks] == [False, False]


def test_masked_entries_bitwise_unchanged_and_selected_ones_train_as_in_one_process(
    sharded_runs, one_process
):
    _, ranks = sharded_runs
    reference, _ = one_process
    initial = dict(toy_model().named_parameters())
    mask = toy_mask(toy_model())
    for run in ranks:
        for key, keep in mask.masks.items():
            final = run["final"][key]
            assert torch.equal(final[~keep], initial[key][~keep]), key
            assert (final[keep] != initial[key][keep]).all(), key
            torch.testing.assert_close(final, reference[key].detach(), rtol=1e-5, atol=1e-6)


def test_clip_norm_counts_only_trainable_entries(sharded_runs, one_process):
    """Equal to one process's norm over masked gradients; a frozen entry's gradient would add."""
    _, ranks = sharded_runs
    _, norms = one_process
    for run in ranks:
        torch.testing.assert_close(run["norms"], norms, rtol=1e-5, atol=0)
    assert all(norm > MAX_NORM for norm in norms)


def test_mask_written_by_rank_zero_and_scoring_a_sharded_model_is_refused(sharded_runs):
    """Rank 0 writes the mask (also into the checkpoint, after training); the other rank lets
    go of it once training starts."""
    out, ranks = sharded_runs
    assert [run["holds_mask"] for run in ranks] == [True, False]
    mask = toy_mask(toy_model())
    saved = FishMask.load(out)
    assert all(torch.equal(saved.masks[key], keep) for key, keep in mask.masks.items())
    for rank in range(WORLD):
        message = (out / f"refused{rank}.txt").read_text()
        assert "already sharded (a DTensor)" in message and "before the model is wrapped" in message


def test_the_checkpoint_delta_holds_the_trained_entries(sharded_runs):
    """Value vectors: gathered by both ranks, the selected entries of partly selected tensors and
    the densely trained tensor whole. Dense masked training writes no delta."""
    out, ranks = sharded_runs
    folder = out / f"checkpoint-{STEPS}"
    assert (folder / MASK_FILENAME).is_file()
    if not ranks[0]["values"]:
        assert not (folder / DELTA_FILENAME).exists()
        return
    delta = SparseDelta.load(folder)
    final = ranks[0]["final"]
    masks = toy_mask(toy_model()).masks
    assert set(delta.values) == {key for key, keep in masks.items() if keep.any()}
    for key, values in delta.values.items():
        keep = masks[key].reshape(-1)
        expected = final[key].reshape(-1)[keep] if key in delta.indices else final[key].reshape(-1)
        assert torch.equal(values.reshape(-1), expected), key
    partly = {key for key, keep in masks.items() if keep.any() and not keep.all()}
    assert set(delta.indices) == partly


def test_sparse_training_refuses_weights_sharded_along_another_dimension(sharded_runs):
    out, _ = sharded_runs
    for rank in range(WORLD):
        message = (out / f"columns{rank}.txt").read_text()
        assert "sharded along their first dimension" in message and "Shard(dim=1)" in message


def test_local_mask_of_a_plain_tensor_is_the_mask():
    mask = torch.tensor([True, False])
    assert torch.equal(local_mask(mask, torch.zeros(2)), mask)
    assert not isinstance(local_mask(mask, torch.zeros(2)), DTensor)


def test_parameters_are_found_by_name_through_activation_checkpointing_wrappers():
    """accelerate's FSDP2 activation checkpointing inserts `_checkpoint_wrapped_module`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = toy_model()
    names = {"first.weight": "0.weight", "last.bias": "2.bias"}
    model[0] = checkpoint_wrapper(model[0])
    assert "0._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
    found = parameters_by_name(model, names)
    assert found["first.weight"] is model[0]._checkpoint_wrapped_module.weight
    assert found["last.bias"] is model[2].bias
    with pytest.raises(ValueError, match=r"parameter '1.weight' \(1 in all\) is gone"):
        parameters_by_name(model, {"x": "1.weight"})


def test_value_vectors_are_sharded_and_alone_hold_optimizer_state(sharded_runs):
    """Value vectors: AdamW state for the k selected entries, split between the ranks. Dense
    masked training: state for every entry of a tensor with a selected one."""
    _, ranks = sharded_runs
    masks = toy_mask(toy_model()).masks
    trained = {key: keep for key, keep in masks.items() if keep.any()}
    if ranks[0]["values"]:
        for key, keep in trained.items():
            if keep.all():
                continue  # trains densely, as a sharded weight
            name = key + VALUES_SUFFIX
            assert {run["values"][name][0] for run in ranks} == {"DTensor"}, key
            assert sum(run["values"][name][1][0] for run in ranks) == int(keep.sum()), key
        assert sum(run["state"] for run in ranks) == sum(int(k.sum()) for k in trained.values())
        assert all(run["state"] > 0 for run in ranks)
    else:
        assert sum(run["state"] for run in ranks) == sum(k.numel() for k in trained.values())


def tied_mask(model: nn.Module) -> FishMask:
    params = trainable_parameters(model)
    total = sum(p.numel() for p in params.values())
    masks = select_top_k(random_scores(params, seed=3), total // 10, seed=0).masks
    return FishMask(masks=masks, metadata={})


def train_tied(model: nn.Module, callback: FishMaskCallback, ranks: list[int]) -> None:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    batches = padded_batches(4 * WORLD, 2)
    for step in range(2):
        loss = sum(model(**batches[WORLD * step + rank]).loss for rank in ranks)
        (loss / len(ranks)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        callback.on_optimizer_step(None, None, None)
        optimizer.zero_grad()


def tied_worker(rank: int, port: int, out_dir: str) -> None:
    """GPT-2 with its head tied to the input embedding, full-parameter value vectors."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = tiny_base_model("gpt2").eval()  # no dropout: ranks and one process agree
        callback = FishMaskCallback(model, tied_mask(model))
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = SimpleNamespace(is_world_process_zero=rank == 0)
        args = SimpleNamespace(output_dir=out_dir)
        callback.on_train_begin(args, state, None, model=model)
        train_tied(model, callback, [rank])
        callback.on_train_end(args, state, None)
        weights = {key: t.full_tensor() for key, t in model.state_dict().items()}
        torch.save(weights, f"{out_dir}/tied{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_tied_head_trains_under_fsdp2_as_in_one_process(tmp_path):
    """The value vector of the tied embedding gets the gradients of both uses on every rank."""
    mp.spawn(tied_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = tiny_base_model("gpt2").eval()
    mask = tied_mask(model)
    callback = FishMaskCallback(model, mask)
    not_main = SimpleNamespace(is_world_process_zero=False)
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), not_main, None)
    train_tied(model, callback, list(range(WORLD)))
    callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), not_main, None)
    assert model.lm_head.weight is model.transformer.wte.weight
    base, reference = tiny_base_model("gpt2").state_dict(), model.state_dict()
    key = "transformer.wte.weight"
    assert 0 < int(mask.masks[key].sum()) < mask.masks[key].numel()
    for rank in range(WORLD):
        weights = torch.load(tmp_path / f"tied{rank}.pt")
        assert torch.equal(weights["lm_head.weight"], weights[key])
        assert torch.equal(weights[key][~mask.masks[key]], base[key][~mask.masks[key]])
        assert (weights[key] != base[key]).any()
        for name, weight in reference.items():
            torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / DELTA_FILENAME).is_file()  # gathered by both ranks, written by rank 0
