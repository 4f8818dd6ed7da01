"""fish_mask.include / exclude: which trainable tensors the mask governs; budgets over them."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from axolotl_run import load_adapter_tensors, run_axolotl_train, write_config
from pydantic import ValidationError
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish import FishMask, FishMaskCallback, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import adapter_parameters, count_entries
from axolotl_fish.masks.candidates import select_candidates
from axolotl_fish.reports.summary import summarize

# tiny_lora_model targets q_proj, v_proj, down_proj in 2 layers: 12 LoRA factors.
INCLUDE = [r"\.q_proj\.", r"\.down_proj\."]
EXCLUDE = [r"layers\.1\..*lora_A"]


def expected_candidates(keys) -> set[str]:
    return {
        key
        for key in keys
        if (".q_proj." in key or ".down_proj." in key)
        and not ("layers.1." in key and "lora_A" in key)
    }


@pytest.mark.parametrize(
    "settings", [{}, {"use_dora": True, "modules_to_save": ["lm_head"]}], ids=["lora", "dora"]
)
def test_adapter_keys_are_found_on_the_meta_device(settings):
    """Tensors without storage (every address 0: Axolotl's rank-0-only loading puts weights on
    the meta device) get the same saved keys as real ones."""
    real = adapter_parameters(tiny_lora_model(**settings))
    with torch.device("meta"):
        meta = adapter_parameters(tiny_lora_model(**settings))
    assert all(p.is_meta for p in meta.values())
    assert {key: p.shape for key, p in meta.items()} == {key: p.shape for key, p in real.items()}


def test_include_then_exclude_by_re_search():
    params = adapter_parameters(tiny_lora_model())
    chosen = select_candidates(params, INCLUDE, EXCLUDE)
    assert set(chosen) == expected_candidates(params)
    assert len(chosen) == 6  # 4 factors of q/down in layer 0, 2 lora_B in layer 1
    assert all(chosen[key] is params[key] for key in chosen)
    assert select_candidates(params) == params
    only_b = select_candidates(params, exclude=["lora_A"])
    assert set(only_b) == {k for k in params if "lora_B" in k}


@pytest.mark.parametrize(
    ("include", "exclude", "message"),
    [
        (["q_proj", "qproj", "kproj"], None, "fish_mask.include pattern(s) ['qproj', 'kproj']"),
        (None, ["lm_head"], "fish_mask.exclude pattern(s) ['lm_head'] match no trainable tensor"),
        (["q_proj"], ["lora_"], "leaves no tensor to mask"),
    ],
)
def test_patterns_that_match_nothing_are_named(include, exclude, message):
    params = adapter_parameters(tiny_lora_model())
    with pytest.raises(ValueError, match=re.escape(message)):
        select_candidates(params, include, exclude)


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_invalid_regex_is_named_at_validation(field):
    with pytest.raises(ValidationError, match=rf"{field}[\s\S]*'q_proj\(' is not a valid regular"):
        FishMaskConfig(keep_ratio=0.5, **{field: ["lora_B", "q_proj("]})
    with pytest.raises(ValidationError, match="include"):
        FishMaskConfig(keep_ratio=0.5, include=[])


@pytest.mark.parametrize(
    ("budget", "expected_k"),
    [
        ({"keep_ratio": 0.25}, lambda c: round(0.25 * count_entries(c))),
        ({"match_rank": 1}, lambda c: count_entries(c) // 4),  # rank 4 -> 1, factors only
    ],
)
def test_budget_counts_candidates_only_and_metadata_records_patterns(budget, expected_k):
    model = tiny_lora_model()
    params = adapter_parameters(model)
    candidates = {k: p for k, p in params.items() if k in expected_candidates(params)}
    config = FishMaskConfig(**budget, include=INCLUDE, exclude=EXCLUDE, num_samples=4)
    mask = compute_fish_mask(model, padded_batches(4, 2), config, progress=False)
    assert set(mask.masks) == set(candidates)
    assert mask.total == count_entries(candidates) < count_entries(params)
    assert mask.k == mask.metadata["k"] == expected_k(candidates)
    assert mask.metadata["include"] == INCLUDE and mask.metadata["exclude"] == EXCLUDE
    assert mask.metadata["dense_outside"] == count_entries(params) - count_entries(candidates)
    assert "outside the mask: " in summarize(mask)


def test_match_rank_needs_lora_factors_among_candidates():
    config = FishMaskConfig(match_rank=2, include=["lora_magnitude_vector"])
    with pytest.raises(
        ValueError,
        match="match_rank needs LoRA factors or bottleneck projections among the candidates",
    ):
        compute_fish_mask(tiny_lora_model(use_dora=True), [], config, progress=False)


def test_callback_masks_candidates_and_leaves_the_rest_dense(tmp_path):
    """The mask file's own include/exclude decide what the callback covers; tensors outside
    keep requires_grad and get no hook, so an optimizer step moves every entry of them."""
    model = tiny_lora_model()
    config = FishMaskConfig(keep_ratio=0.3, include=INCLUDE, exclude=EXCLUDE, strategy="random")
    mask = FishMask.load(compute_fish_mask(model, [], config, progress=False).save(tmp_path))
    params = adapter_parameters(model)
    initial = {k: p.detach().clone() for k, p in params.items()}
    callback = FishMaskCallback(model, mask)
    not_main = SimpleNamespace(is_world_process_zero=False)  # writes no mask file
    callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), not_main, None)
    outside = [key for key in params if key not in mask.masks]
    assert outside and all(params[key].requires_grad for key in outside)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**padded_batches(4, 4)[0]).loss.backward()
    optimizer.step()
    callback.on_optimizer_step(None, None, None)
    for key, param in params.items():
        changed = param.detach() != initial[key]
        if key in mask.masks:
            assert not changed[~mask.masks[key]].any(), key
        else:
            assert changed.all(), key

    no_patterns = FishMask(masks=mask.masks, metadata={})  # as if made without include/exclude
    with pytest.raises(ValueError, match="The mask has no entry for tensor"):
        FishMaskCallback(tiny_lora_model(), no_patterns)


@pytest.mark.e2e
def test_axolotl_include_exclude(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """Exact k over the candidates (layer 0's q_proj factors); masked entries unchanged in the
    checkpoints; every other adapter tensor trains densely."""
    fish_mask = {"keep_ratio": 0.3, "num_samples": 8, "include": ["q_proj"], "exclude": [r"\.1\."]}
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        plugins=["axolotl_fish.FishMaskPlugin"],
        weight_decay=0.1,
        max_grad_norm=0.5,
        fish_mask=fish_mask,
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    out = tmp_path / "out"
    first, final = load_adapter_tensors(out / "checkpoint-2"), load_adapter_tensors(out)
    mask = FishMask.load(out)
    assert set(mask.masks) == {
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_{m}.weight" for m in "AB"
    }
    assert mask.k == round(0.3 * mask.total) == mask.metadata["k"]
    assert mask.total == sum(first[key].numel() for key in mask.masks)
    assert mask.metadata["include"] == ["q_proj"] and mask.metadata["exclude"] == [r"\.1\."]
    assert "train densely, outside k" in log and "outside the mask: " in log
    for key, tensor in final.items():
        if key in mask.masks:
            keep = mask.masks[key]
            assert torch.equal(tensor[~keep], first[key][~keep]), key
            if "lora_B" in key:
                assert not tensor[~keep].any(), key  # lora_B starts at 0
        else:
            assert (tensor != first[key]).all(), key  # dense: every entry moves


@pytest.mark.parametrize("restore", [True, False])
def test_warmup_trains_and_restores_every_trainable_tensor(restore):
    """Outside tensors train densely in the run, so the warm-up treats them the same way: they
    warm up with the candidates, are restored with them, and are left without a stale .grad."""
    model = tiny_lora_model(nonzero_b=False)
    params = adapter_parameters(model)
    initial = {k: p.detach().clone() for k, p in params.items()}
    config = FishMaskConfig(
        keep_ratio=0.5, include=INCLUDE, warmup_steps=2, restore_after_warmup=restore
    )
    mask = compute_fish_mask(model, padded_batches(8, 4), config, progress=False)
    outside_b = [k for k in params if k not in mask.masks and "lora_B" in k]
    assert outside_b
    for key in outside_b:
        assert torch.equal(params[key].detach(), initial[key]) == restore, key
    assert all(p.grad is None for p in model.parameters())
