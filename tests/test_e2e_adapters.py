"""`axolotl train` with adapters other than LoRA: `adapter: bottleneck` (this package's
Adapter-FISH) and Axolotl's built-in `llama-adapter`, through the real CLI in a subprocess."""

from __future__ import annotations

import pytest
import torch
from axolotl_run import (
    assert_masked_entries_equal,
    bottleneck_file,
    bottleneck_model,
    initial_bottleneck,
    load_adapter_tensors,
    moved_entries,
    resume_from_copy,
    run_axolotl_train,
    write_config,
)
from safetensors.torch import load_file
from test_e2e_axolotl import FISH, HARSH, assert_frozen_outside_mask
from transformers import AutoModelForCausalLM

from axolotl_fish.adapters.bottleneck import load_bottleneck
from axolotl_fish.masks.file import FishMask

pytestmark = pytest.mark.e2e

BOTTLENECK = {"size": 8, "nonlinearity": "gelu"}
# Size 8 masked to the entry count of size 4, down and up budgets apart, after a dense warm-up.
BOTTLENECK_MASK = {
    "match_rank": 4,
    "scope": "per_matrix",
    "warmup_steps": 2,
    "num_samples": 8,
    "seed": 42,
}
HIDDEN, LAYERS = 64, 2  # the tiny models of axolotl_run


def bottleneck_config(tmp, base_dir, data, fish_mask, **overrides):
    return write_config(
        tmp,
        base_dir,
        data,
        **FISH,
        **HARSH,
        adapter="bottleneck",
        bottleneck=BOTTLENECK,
        fish_mask=fish_mask,
        **overrides,
    )


@pytest.fixture(scope="module")
def bottleneck_run(tmp_path_factory, tiny_llama_dir, alpaca_jsonl):
    """One 4-step Adapter-FISH run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("bottleneck_run")
    config = bottleneck_config(tmp, tiny_llama_dir, alpaca_jsonl, BOTTLENECK_MASK)
    log = run_axolotl_train(config, cwd=tmp).stdout
    return tmp / "out", log


def test_bottleneck_exact_k_and_masked_entries_keep_their_initial_values(
    bottleneck_run, tiny_llama_dir
):
    out, log = bottleneck_run
    folders = [out / "checkpoint-2", out / "checkpoint-4", out]
    mask = FishMask.load(out)
    initial = initial_bottleneck(tiny_llama_dir, **BOTTLENECK)
    assert set(mask.masks) == set(bottleneck_file(out)) == set(initial)
    assert len(initial) == LAYERS * 2 * 4  # attention and MLP adapters: down/up weight/bias
    # Entries of a dense size-4 adapter: down (4 x hidden + 4), up (hidden x 4 + hidden).
    assert mask.k == LAYERS * 2 * (4 * HIDDEN + 4 + HIDDEN * 4 + HIDDEN) == mask.metadata["k"]
    assert mask.metadata["peft_type"] == "BOTTLENECK" and mask.metadata["bottleneck_size"] == 8
    assert "tie_breaks" not in mask.metadata  # the warm-up gave the down-projections real scores
    for folder in folders:
        saved = FishMask.load(folder)
        assert all(torch.equal(saved.masks[k], m) for k, m in mask.masks.items())
    assert_masked_entries_equal(mask, initial, folders)
    assert moved_entries(mask, bottleneck_file(out), initial) > 0.5 * mask.k
    assert "bottleneck: 4 houlsby adapters of size 8 (gelu)" in log


def test_loader_output_equals_the_trained_model(bottleneck_run, tiny_llama_dir, tiny_tokenizer):
    """The Trainer's own full save (base + adapters) and base + `load_bottleneck` agree."""
    out, _ = bottleneck_run
    trained = bottleneck_model(tiny_llama_dir, **BOTTLENECK)
    trained.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    loaded = load_bottleneck(base, out)
    batch = tiny_tokenizer(
        ["the movie was great.", "the plot was dull."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = trained.eval()(**batch).logits
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=0, atol=0)
        untrained = bottleneck_model(tiny_llama_dir, **BOTTLENECK).eval()(**batch).logits
    assert not torch.allclose(untrained, expected)


def test_bottleneck_resume_keeps_mask_and_continues_the_run(
    bottleneck_run, tmp_path, tiny_llama_dir, alpaca_jsonl
):
    out, _ = bottleneck_run
    resumed_out = resume_from_copy(out, tmp_path)
    # Another strategy and seed: a recomputed mask would differ, the checkpoint's must win.
    other = {"match_rank": 4, "strategy": "random", "seed": 7}
    config = bottleneck_config(
        tmp_path, tiny_llama_dir, alpaca_jsonl, other, auto_resume_from_checkpoints=True
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    assert "resuming with the mask saved in" in log
    original = FishMask.load(out)
    resumed = FishMask.load(resumed_out)
    assert all(torch.equal(resumed.masks[k], m) for k, m in original.masks.items())
    # The checkpoint's adapter, optimizer and schedule were restored: the run ends where the
    # uninterrupted one ended.
    final, uninterrupted = bottleneck_file(resumed_out), bottleneck_file(out)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-7)
    assert_masked_entries_equal(
        original, bottleneck_file(out / "checkpoint-2"), [resumed_out / "checkpoint-4", resumed_out]
    )


def test_llama_adapter_is_masked_like_any_adapter(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """Axolotl's `llama-adapter` (PEFT adaption prompt): its prompts and gates are the candidates.
    Its gate starts at 0 (every prompt score would be 0), hence the warm-up."""
    fish_mask = {"keep_ratio": 0.3, "num_samples": 8, "warmup_steps": 2}
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **FISH,
        **HARSH,
        adapter="llama-adapter",
        peft_adapter={"layers": 1, "len": 4},
        fish_mask=fish_mask,
    )
    run_axolotl_train(config, cwd=tmp_path)
    out = tmp_path / "out"
    mask = FishMask.load(out)
    adapter = load_adapter_tensors(out)
    assert set(mask.masks) == set(adapter)
    assert {key.rsplit(".", 1)[-1] for key in adapter} == {"adaption_prompt", "adaption_gate"}
    assert mask.total == 4 * HIDDEN + 1 and mask.k == round(0.3 * mask.total)
    assert mask.metadata["peft_type"] == "ADAPTION_PROMPT" and mask.metadata["adapter_len"] == 4
    first = load_adapter_tensors(out / "checkpoint-2")
    assert_frozen_outside_mask(mask, first, [out / "checkpoint-4", out])
    moved = sum(int((adapter[k] != first[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0
