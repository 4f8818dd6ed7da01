"""Budgets (keep_ratio, keep_params, match_rank) and scopes (global, per_tensor, per_matrix)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.masks.budget import budget, budget_groups, entries_at_rank
from axolotl_fish.masks.selection import apportion, select_in_groups

# A rank-4 adapter on two modules: A is r x in, B is out x r; plus a DoRA-like magnitude.
TENSORS = {
    "m.q_proj.lora_A.weight": torch.zeros(4, 10),
    "m.q_proj.lora_B.weight": torch.zeros(6, 4),
    "m.v_proj.lora_A.weight": torch.zeros(4, 10),
    "m.v_proj.lora_B.weight": torch.zeros(3, 4),
    "m.v_proj.lora_magnitude_vector": torch.zeros(3),
}
TOTAL = 40 + 24 + 40 + 12 + 3


@pytest.mark.parametrize(
    ("settings", "k"),
    [
        ({"keep_ratio": 0.5}, round(0.5 * TOTAL)),
        ({"keep_params": 17}, 17),
        ({"match_rank": 2}, 20 + 12 + 20 + 6 + 3),
        ({"match_rank": 4}, TOTAL),
    ],
)
def test_budget(settings, k):
    assert budget(FishMaskConfig(**settings), TENSORS) == k


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"keep_params": TOTAL + 1},
            "keep_params=120 selects 120 entries, but the candidates have 119",
        ),
        ({"keep_ratio": 0.001}, "keep_ratio=0.001 selects 0 entries"),
        ({"match_rank": 5}, "match_rank=5 exceeds the rank 4 of tensor 'm.q_proj.lora_A.weight'"),
    ],
)
def test_impossible_budgets_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        budget(FishMaskConfig(**settings), TENSORS)


@pytest.mark.parametrize("settings", [{}, {"keep_ratio": 0.5, "keep_params": 3}])
def test_exactly_one_budget_key(settings):
    with pytest.raises(ValidationError, match="set exactly one of fish_mask.keep_ratio"):
        FishMaskConfig(**settings)


def test_rank_16_masked_to_rank_8_equals_dense_rank_8_count():
    rank16 = {"a.lora_A.weight": torch.zeros(16, 64), "a.lora_B.weight": torch.zeros(32, 16)}
    rank8 = {"a.lora_A.weight": torch.zeros(8, 64), "a.lora_B.weight": torch.zeros(32, 8)}
    assert entries_at_rank(rank16, 8) == sum(t.numel() for t in rank8.values())


def test_apportion_sums_exactly():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    for k in range(0, 50):
        assert sum(apportion(k, [7, 13, 29, 1])) == k


def random_scores(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.rand(t.shape, generator=generator) for key, t in TENSORS.items()}


def test_per_tensor_scope_keeps_each_tensors_fraction():
    k = 60
    masks, _ = select_in_groups(random_scores(), k, 0, budget_groups(list(TENSORS), "per_tensor"))
    assert sum(int(m.sum()) for m in masks.values()) == k
    for key, mask in masks.items():
        assert abs(int(mask.sum()) - k * mask.numel() / TOTAL) < 1, key


def test_per_matrix_scope_splits_a_and_b_by_size():
    scores = random_scores()
    for key in scores:  # make every B score beat every A score
        if "lora_B" in key:
            scores[key] += 10
    groups = budget_groups(list(TENSORS), "per_matrix")
    assert [len(g) for g in groups] == [2, 2, 1]
    masks, _ = select_in_groups(scores, 59, 0, groups)
    a = sum(int(m.sum()) for key, m in masks.items() if "lora_A" in key)
    b = sum(int(m.sum()) for key, m in masks.items() if "lora_B" in key)
    assert (a, b) == tuple(apportion(59, [80, 36, 3])[:2])
    global_masks, _ = select_in_groups(scores, 59, 0, budget_groups(list(TENSORS), "global"))
    assert all(global_masks[key].all() for key in TENSORS if "lora_B" in key)  # global: B first
