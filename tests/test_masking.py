"""Only selected entries move: AdamW weight decay, accumulation and clipping included."""

from __future__ import annotations

import torch
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores
from axolotl_fish.training.masking import GradientMask


def masked_setup(keep: float = 0.3, empty_key_part: str | None = "lora_A"):
    model = tiny_lora_model("llama", nonzero_b=False)
    params = adapter_parameters(model)
    scores = random_scores(params, seed=0)
    if empty_key_part:  # make some tensors lose every entry, as lora_A does at init
        scores = {
            k: s * 0 if empty_key_part in k and "layers.0" in k else s for k, s in scores.items()
        }
    total = sum(p.numel() for p in params.values())
    masks = select_top_k(scores, round(keep * total), seed=0).masks
    return model, params, masks


def test_masked_entries_bitwise_frozen_under_adamw_decay_accumulation_and_clipping():
    model, params, masks = masked_setup()
    initial = {k: p.detach().clone() for k, p in params.items()}
    gradient_mask = GradientMask(params, masks)
    gradient_mask.snapshot()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    batches = padded_batches(16, 4)
    model.train()
    for step in range(4):
        for micro in batches[2 * (step % 2) : 2 * (step % 2) + 2]:  # accumulate 2 micro-batches
            (model(**micro).loss / 2).backward()
        for key, param in params.items():
            if param.grad is not None:  # masked before clipping: frozen entries add nothing
                assert not param.grad[~masks[key]].any(), key
        torch.nn.utils.clip_grad_norm_(trainable, max_norm=0.01)
        optimizer.step()
        optimizer.zero_grad()
        gradient_mask.restore()
    moved = 0
    for key, param in params.items():
        frozen = ~masks[key]
        assert torch.equal(param.detach()[frozen], initial[key][frozen]), key
        moved += int((param.detach() != initial[key])[masks[key]].sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())


def test_tensors_without_selected_entries_stop_requiring_grad():
    _, params, masks = masked_setup()
    GradientMask(params, masks)
    empty = [k for k, m in masks.items() if not m.any()]
    assert empty, "the setup must produce empty tensors"
    for key, param in params.items():
        assert param.requires_grad == bool(masks[key].any()), key


def test_restore_is_needed_weight_decay_moves_zero_grad_entries():
    """Guards the test above: without restore(), AdamW decay moves masked entries."""
    model, params, masks = masked_setup(empty_key_part=None)
    initial = {k: p.detach().clone() for k, p in params.items()}
    GradientMask(params, masks)
    optimizer = torch.optim.AdamW([p for p in params.values()], lr=1e-2, weight_decay=0.1)
    model(**padded_batches(4, 4)[0]).loss.backward()
    optimizer.step()
    changed = [
        k
        for k, p in params.items()
        if not torch.equal(p.detach()[~masks[k]], initial[k][~masks[k]])
    ]
    assert changed
