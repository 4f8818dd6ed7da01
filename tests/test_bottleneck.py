"""Bottleneck adapters: placement, identity at init, save/load, Fisher path, budget roles."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_fisher import reference_fisher
from tiny_peft import padded_batches, tiny_base_model

from axolotl_fish.adapters.bottleneck import (
    ADAPTER_FILENAME,
    CONFIG_FILENAME,
    BottleneckConfig,
    add_bottleneck,
    bottleneck_parameters,
    load_bottleneck,
    save_bottleneck,
)
from axolotl_fish.adapters.tensors import model_parameters, rank_axis, tensor_role
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.masks.budget import budget_groups, entries_at_rank
from axolotl_fish.pipeline.compute import compute_fish_mask


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturbed(model, seed=1):
    """Give every adapter tensor (the zero up-projections too) random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bottleneck_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize(
    ("arch", "placement", "sublayers"),
    [
        ("llama", "houlsby", ("self_attn", "mlp")),
        ("llama", "pfeiffer", ("mlp",)),
        ("gpt2", "houlsby", ("attn", "mlp")),
    ],
)
def test_placement_identity_at_init_and_only_adapters_train(arch, placement, sublayers):
    batch = padded_batches(n_rows=3, batch_size=3)[0]
    model = tiny_base_model(arch)
    before = logits(model, batch)
    add_bottleneck(model, BottleneckConfig(placement=placement, size=8, nonlinearity="gelu"))
    params = bottleneck_parameters(model)
    expected = {
        f"{layer}.{sublayer}.bottleneck.{proj}.{kind}"
        for layer in range(2)
        for sublayer in sublayers
        for proj in ("down", "up")
        for kind in ("weight", "bias")
    }
    assert {re.sub(r"^.*?\.(layers|h)\.", "", key) for key in params} == expected
    assert set(model_parameters(model)) == set(params)  # the base is frozen
    assert all(not p.any() for k, p in params.items() if ".up." in k)
    assert params[next(k for k in params if k.endswith("down.weight"))].any()
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    perturbed(model)
    assert not torch.allclose(logits(model, batch), before)


def test_init_is_configurable_and_seeded():
    def down(**settings):
        model = add_bottleneck(tiny_base_model(), BottleneckConfig(size=8, **settings))
        return next(
            p.detach() for k, p in bottleneck_parameters(model).items() if "down.weight" in k
        )

    torch.testing.assert_close(down(), down())
    assert not torch.equal(down(), down(init_seed=1))
    normal = down(init="normal", init_std=0.5)
    assert 0.3 < float(normal.std()) < 0.7 and float(down().abs().max()) <= 1 / 32**0.5


def test_loader_reproduces_the_trained_model(tmp_path):
    batch = padded_batches(n_rows=4, batch_size=4)[0]
    config = BottleneckConfig(size=6, nonlinearity="tanh", placement="houlsby")
    trained = perturbed(add_bottleneck(tiny_base_model("llama"), config))
    save_bottleneck(trained, tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILENAME).read_text())
    assert saved["bottleneck"] == config.model_dump()
    loaded = load_bottleneck(tiny_base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_loader_refuses_what_does_not_fit(tmp_path):
    save_bottleneck(add_bottleneck(tiny_base_model("llama"), BottleneckConfig(size=4)), tmp_path)
    with pytest.raises(ValueError, match=r"model has no adapter tensor 'model\.layers\.0"):
        load_bottleneck(tiny_base_model("gpt2"), tmp_path)
    (tmp_path / ADAPTER_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_FILENAME):
        load_bottleneck(tiny_base_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="no bottleneck adapter to save"):
        save_bottleneck(tiny_base_model("llama"), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_batched_path_matches_reference_without_per_example_loop(monkeypatch, arch):
    import axolotl_fish.fisher.scores as fisher

    def forbidden(*args, **kwargs):
        raise AssertionError("bottleneck projections must take the batched path")

    model = perturbed(add_bottleneck(tiny_base_model(arch), BottleneckConfig(size=4)))
    params = bottleneck_parameters(model)
    batches = padded_batches(n_rows=7, batch_size=4)
    reference = reference_fisher(model, batches, params, num_samples=7)
    monkeypatch.setattr(fisher, "_accumulate_rowwise", forbidden)
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    assert set(result.scores) == set(reference)
    for key, score in reference.items():
        torch.testing.assert_close(result.scores[key], score, rtol=1e-4, atol=1e-12)


def test_roles_match_rank_is_the_bottleneck_size_and_per_matrix_groups():
    model = add_bottleneck(tiny_base_model(), BottleneckConfig(size=8))
    params = bottleneck_parameters(model)
    down, up = "model.layers.1.mlp.bottleneck.down", "model.layers.1.mlp.bottleneck.up"
    assert tensor_role(f"{down}.weight") == ("mlp", "bottleneck.down")
    assert [rank_axis(f"{down}.weight"), rank_axis(f"{down}.bias")] == [0, 0]
    assert [rank_axis(f"{up}.weight"), rank_axis(f"{up}.bias")] == [1, None]
    dense = bottleneck_parameters(add_bottleneck(tiny_base_model(), BottleneckConfig(size=3)))
    assert entries_at_rank(params, 3) == sum(p.numel() for p in dense.values())
    with pytest.raises(ValueError, match="match_rank=9 exceeds the rank 8"):
        entries_at_rank(params, 9)
    groups = budget_groups(list(params), "per_matrix")
    names = [sorted({".".join(key.split(".")[-2:]) for key in group}) for group in groups]
    assert names == [["down.bias", "down.weight"], ["up.weight"], ["up.bias"]]


def test_zero_up_projection_gives_zero_down_scores_and_warmup_fixes_it():
    """Like LoRA's B = 0: every down-projection score is 0 at init (ties); a dense warm-up with
    restore gives them real scores and leaves the adapter as it started."""
    batches = padded_batches(n_rows=8, batch_size=4)

    def run(warmup_steps):
        model = add_bottleneck(tiny_base_model(), BottleneckConfig(size=4))
        initial = {k: p.detach().clone() for k, p in bottleneck_parameters(model).items()}
        config = FishMaskConfig(keep_ratio=0.8, num_samples=8, warmup_steps=warmup_steps)
        mask = compute_fish_mask(model, batches, config, learning_rate=1e-2, progress=False)
        for key, param in bottleneck_parameters(model).items():
            assert torch.equal(param, initial[key]), key
        return mask

    cold = run(0)
    assert cold.metadata["tie_breaks"] and cold.metadata["peft_type"] == "BOTTLENECK"
    assert cold.metadata["bottleneck_size"] == 4
    warm = run(2)
    assert "tie_breaks" not in warm.metadata and warm.k == cold.k == round(0.8 * cold.total)
    assert any(m.any() for k, m in warm.masks.items() if "down.weight" in k)


def test_axolotl_loader_builds_fresh_or_saved_adapters_and_leaves_other_adapters(tmp_path):
    from axolotl.utils.dict import DictDefault

    from axolotl_fish.integration.bottleneck import load

    batch = padded_batches(n_rows=2, batch_size=2)[0]
    assert load(tiny_base_model(), DictDefault(adapter="lora"), config_only=False) is None
    cfg = DictDefault(adapter="bottleneck", bottleneck={"size": 4, "placement": "pfeiffer"})
    fresh, peft_config = load(tiny_base_model(), cfg, config_only=False)
    assert peft_config is None and len(bottleneck_parameters(fresh)) == 2 * 4
    save_bottleneck(perturbed(fresh), tmp_path)
    cfg = DictDefault(adapter="bottleneck", lora_model_dir=str(tmp_path))
    loaded, _ = load(tiny_base_model(), cfg, config_only=False)
    torch.testing.assert_close(logits(loaded, batch), logits(fresh, batch), rtol=0, atol=0)
