"""Exactly k entries by one global ranking; ties broken by a seeded draw."""

from __future__ import annotations

import pytest
import torch

from axolotl_fish.masks.selection import select_top_k


def count(masks):
    return sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("k", [1, 7, 50, 99, 100])
def test_exactly_k_and_highest_scores(k):
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 5, generator=generator), "b": torch.rand(50, generator=generator)}
    selection = select_top_k(scores, k, seed=0)
    assert count(selection.masks) == k
    flat = torch.cat([scores["a"].flatten(), scores["b"]])
    keep = torch.cat([selection.masks["a"].flatten(), selection.masks["b"]])
    assert set(flat.topk(k).indices.tolist()) == set(keep.nonzero()[:, 0].tolist())
    assert selection.masks["a"].shape == (10, 5) and selection.masks["a"].dtype == torch.bool


def test_global_not_per_tensor():
    scores = {"small": torch.full((10,), 5.0), "big": torch.arange(10.0) / 10}
    masks = select_top_k(scores, 12, seed=0).masks
    assert masks["small"].all()
    assert masks["big"].tolist() == [False] * 8 + [True] * 2


def test_ties_are_drawn_at_random_not_by_position():
    # The zero-B case: A scores all exactly 0, B scores positive; k reaches into the ties.
    scores = {"A": torch.zeros(1000), "B": torch.ones(100)}
    selection = select_top_k(scores, 300, seed=1)
    assert selection.masks["B"].all()
    chosen = selection.masks["A"].nonzero()[:, 0]
    assert len(chosen) == 200
    assert chosen.float().mean() > 300  # first 200 positions would average 99.5
    assert selection.tie_break is not None
    assert (selection.tie_break.tied, selection.tie_break.chosen) == (1000, 200)
    again = select_top_k(scores, 300, seed=1).masks["A"]
    other = select_top_k(scores, 300, seed=2).masks["A"]
    assert torch.equal(again, selection.masks["A"])
    assert not torch.equal(other, selection.masks["A"])


def test_no_tie_break_reported_when_none_was_needed():
    assert select_top_k({"x": torch.arange(10.0)}, 3, seed=0).tie_break is None


def test_non_finite_scores_name_the_tensor():
    with pytest.raises(ValueError, match=r"'layer\.lora_B'"):
        select_top_k({"ok": torch.ones(3), "layer.lora_B": torch.tensor([1.0, float("nan")])}, 1, 0)


def test_k_outside_range_is_refused():
    with pytest.raises(ValueError, match="between 1 and"):
        select_top_k({"x": torch.ones(3)}, 4, seed=0)


def concatenated_top_k(scores, k, seed):
    """The previous implementation (one fp32 vector of every score): the masks must not change."""
    flat = torch.cat([s.float().flatten() for s in scores.values()])
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    keep = flat > threshold
    tied = (flat == threshold).nonzero()[:, 0]
    needed = k - int(keep.sum())
    generator = torch.Generator().manual_seed(seed)
    keep[tied[torch.randperm(tied.numel(), generator=generator)[:needed]]] = True
    sizes = [s.numel() for s in scores.values()]
    parts = keep.split(sizes)
    return {key: part.view(s.shape) for (key, s), part in zip(scores.items(), parts, strict=True)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_masks_as_one_concatenated_vector(seed):
    """Ties, negative scores (`reverse`), -0.0, tiny and huge values, k at both ends."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, -0.0, 1e-30, 3e-7, 3e-7, 0.5, 1e20, -2.0, -1e-12])
    scores = {
        "a": levels[torch.randint(0, len(levels), (40, 30), generator=generator)],
        "empty_ties": torch.zeros(7),
        "b": torch.randn(500, generator=generator) * 1e-6,
        "c": -torch.rand(3, 4, 5, generator=generator),
    }
    total = sum(s.numel() for s in scores.values())
    for k in (1, 13, 600, 1199, 1200, 1700, total - 1, total):
        selection = select_top_k(scores, k, seed)
        expected = concatenated_top_k(scores, k, seed)
        assert count(selection.masks) == k
        for key in scores:
            assert torch.equal(selection.masks[key], expected[key]), (k, key)
