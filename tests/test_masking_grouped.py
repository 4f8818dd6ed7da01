"""Grouped masking: a fixed number of operators per step whatever the number of masked tensors,
inf and NaN gradients at frozen entries zeroed, one masking per backward under reentrant
gradient checkpointing (after the outer backward, where DDP's copy of the buckets happens)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from axolotl_run import free_port
from benchmark_modules import benchmarks_importable
from tiny_peft import padded_batches, tiny_lora_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from axolotl_fish.training.masking import FrozenEntries, GradientMask

ALL_LINEAR = ("k_proj", "o_proj", "gate_proj", "up_proj")  # with tiny_peft's q, v, down: 28


def test_operators_a_mask_adds_do_not_grow_with_masked_tensors():
    with benchmarks_importable():
        import step_overhead

    def fresh() -> nn.Module:
        return tiny_lora_model("llama", extra_targets=ALL_LINEAR)

    batch = padded_batches(4, 4)[0]
    added = step_overhead.added_operators(fresh, batch, [4, 28])
    assert added[4] == added[28], added
    # per backward: copy in, fill, copy back; per step: the same for the restore
    assert added[28] == {"aten._foreach_copy_": 4, "aten.masked_fill_": 1, "aten.where": 1}


def test_inf_and_nan_gradients_at_frozen_entries_leave_weights_finite():
    """A multiplication by a 0/1 mask would turn them into NaN, the clip norm into NaN and every
    weight with it."""
    weight = nn.Parameter(torch.randn(4, 6))
    frozen = torch.zeros(4, 6, dtype=torch.bool)
    frozen[:, :3] = True
    upstream = torch.randn(4, 6)
    upstream[0, 0], upstream[1, 1], upstream[2, 2] = float("inf"), float("nan"), -float("inf")
    initial = weight.detach().clone()
    gradient_mask = GradientMask({"w": weight}, {"w": ~frozen})
    gradient_mask.snapshot()
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.1)
    (weight * upstream).sum().backward()
    assert torch.equal(weight.grad[frozen], torch.zeros(12))
    assert torch.equal(weight.grad[~frozen], upstream[~frozen])  # trainable entries untouched
    torch.nn.utils.clip_grad_norm_([weight], 1.0)
    optimizer.step()
    gradient_mask.restore()
    assert weight.isfinite().all()
    assert torch.equal(weight.detach()[frozen], initial[frozen])
    assert not torch.equal(weight.detach()[~frozen], initial[~frozen])


def test_restore_is_bitwise_for_signed_zeros_nan_and_mixed_dtypes():
    tensors = [torch.randn(3, 5), torch.randn(7).to(torch.bfloat16), torch.randn(2, 2)]
    tensors[0][0, 0] = -0.0
    frozen = [torch.rand(t.shape) < 0.5 for t in tensors]
    frozen[0][0, 0] = True
    entries = FrozenEntries(tensors, frozen)
    initial = [t.clone() for t in tensors]
    entries.snapshot(tensors)
    for t in tensors:
        t.fill_(float("nan"))
    entries.restore_(tensors)
    for t, f, i in zip(tensors, frozen, initial, strict=True):
        assert torch.equal(bits(t)[f], bits(i)[f])  # -0.0 stays -0.0
        assert t[~f].isnan().all()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


class Checkpointed(nn.Module):
    """A linear layer, then two more, each run under (by default reentrant) checkpointing."""

    def __init__(self, reentrant: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.first = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=self.reentrant)
        return x.sum()

    def masks(self) -> dict[str, torch.Tensor]:
        """Half of each checkpointed layer's entries, the same on every rank."""
        generator = torch.Generator().manual_seed(1)
        named = self.named_parameters()
        return {n: torch.rand(p.shape, generator=generator) < 0.5 for n, p in named if "lay" in n}


def test_reentrant_checkpointing_masks_once_after_the_outer_backward():
    """The checkpointed layers' gradients arrive in nested backwards, `first`'s after them in the
    outer one (as, under DDP, the copy of the reduced buckets into `.grad` may): the masking
    waits for the outer backward and runs once."""
    model = Checkpointed()
    masks = model.masks()
    params = {key: p for key, p in model.named_parameters() if key in masks}
    gradient_mask = GradientMask(params, masks)
    seen: list[bool] = []  # at each masking: had `first` (outer backward) its gradient yet?
    mask_gradients = gradient_mask.mask_gradients

    def spy() -> None:
        seen.append(model.first.weight.grad is not None)
        mask_gradients()

    gradient_mask.mask_gradients = spy
    model(torch.randn(3, 8)).backward()
    assert seen == [True]
    for key, param in params.items():
        assert not param.grad[~masks[key]].any(), key
        assert param.grad[masks[key]].all(), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_split_at_group_bytes(monkeypatch, dtype):
    monkeypatch.setattr("axolotl_fish.training.masking.GROUP_BYTES", 100)
    tensors = [torch.randn(n, dtype=dtype) for n in (10, 10, 40, 5)]
    frozen = [torch.rand(t.shape) < 0.5 for t in tensors]
    entries = FrozenEntries(tensors, frozen)
    grads = [torch.full(t.shape, float("inf"), dtype=dtype) for t in tensors]
    entries.zero_([grads[0], None, grads[2], grads[3]])
    assert len(entries._groups) == (3 if dtype == torch.float32 else 2)
    for g, f in zip(grads, frozen, strict=True):
        if g is not grads[1]:
            assert not g[f].any() and g[~f].isinf().all()
    assert grads[1].isinf().all()  # None in its place: left alone


@pytest.mark.parametrize("each_gradient", [True, False])
def test_each_gradient_masks_before_a_later_hook_takes_the_gradient(each_gradient):
    """As DeepSpeed's hooks (registered after ours) copy each gradient away at once."""
    weight = nn.Parameter(torch.randn(4, 6))
    keep = torch.rand(4, 6) < 0.5
    GradientMask({"w": weight}, {"w": keep}, each_gradient=each_gradient)
    taken: list[torch.Tensor] = []
    weight.register_post_accumulate_grad_hook(lambda p: taken.append(p.grad.clone()) and None)
    (weight * torch.randn(4, 6)).sum().backward()
    assert bool(taken[0][~keep].any()) is not each_gradient  # grouped: masked only at the end
    assert not weight.grad[~keep].any()


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for reentrant in (True, False):
            model = Checkpointed(reentrant)
            masks = model.masks()
            params = {key: p for key, p in model.named_parameters() if key in masks}
            GradientMask(params, masks)
            ddp = DistributedDataParallel(model)  # alive through backward: it reduces then
            torch.manual_seed(rank)  # each rank its own examples
            ddp(torch.randn(3, 8)).backward()
            results[reentrant] = {key: (p.grad, masks[key]) for key, p in params.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_masked_after_the_reduced_buckets_are_copied(tmp_path):
    """DDP copies the all-reduced buckets into `.grad` in a callback at the end of backward (with
    reentrant checkpointing and `first` trained, in the outer backward, after every masked
    tensor's gradient arrived): the masking runs after it."""
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for reentrant in (True, False):
        for key, (grad, keep) in ranks[0][reentrant].items():
            assert not grad[~keep].any(), (reentrant, key)
            assert grad[keep].all(), (reentrant, key)
            assert torch.equal(grad, ranks[1][reentrant][key][0]), (reentrant, key)  # reduced
