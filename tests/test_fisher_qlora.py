"""QLoRA in the batched Fisher pass: PEFT's LoRA layers over bitsandbytes 4-bit and 8-bit linears
(as Axolotl loads `adapter: qlora`), on the CPU. Every adapter tensor is claimed by a rule, the
scores equal the batch-size-1 reference with the per-example loop made to fail, and the pass
leaves the quantized base as it was loaded."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_fisher import max_relative_error, reference_fisher
from test_fisher_rules import no_per_example_loop
from tiny_peft import padded_batches, quantized_llama, tiny_lora_model
from torch import nn

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.fisher.rules import DoraMagnitudeRule, LinearRule, claim_rules
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.reports.quantized import quantized_base

# bits -> (bitsandbytes' base layer, PEFT's LoRA layer over it)
QUANTIZED = {4: (bnb.nn.Linear4bit, "Linear4bit"), 8: (bnb.nn.Linear8bitLt, "Linear8bitLt")}
# What the plugin logs for each (2 layers x 7 projections; lm_head stays dense).
LAYOUT = {
    (4, torch.bfloat16): "Linear4bit (nf4, 4 per bfloat16)",
    (4, torch.uint8): "Linear4bit (nf4, 2 per uint8)",
    (8, None): "Linear8bitLt (int8)",
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized_llama")


def quantized_lora(base_dir, bits: int, storage=torch.bfloat16, **lora) -> nn.Module:
    """LoRA on q/v/down_proj of the quantized tiny Llama, lora_B perturbed (non-zero scores);
    fails unless every adapted layer really is a quantized one: 4-bit codes packed several per
    `storage` element, 8-bit weights stored as int8."""
    model = tiny_lora_model(base=quantized_llama(base_dir, bits, storage), **lora)
    base_class, lora_class = QUANTIZED[bits]
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(layers) == 6
    for layer in layers:
        assert (type(layer).__module__, type(layer).__name__) == (
            "peft.tuners.lora.bnb",
            lora_class,
        )
        base = layer.get_base_layer()
        dtype = storage if bits == 4 else torch.int8
        per_element = dtype.itemsize * 8 // bits
        assert type(base) is base_class and base.weight.dtype == dtype
        assert base.weight.numel() * per_element == base.in_features * base.out_features
    return model


def stored(layer: bnb.nn.Linear4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of a 4-bit layer's packed codes and of its block scales, copied."""
    state = layer.weight.quant_state
    return layer.weight.detach().view(torch.uint8).clone(), state.absmax.view(torch.uint8).clone()


def four_bit_layers(model: nn.Module) -> list[bnb.nn.Linear4bit]:
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


@pytest.mark.parametrize(
    ("bits", "storage", "lora"),
    [
        (4, torch.bfloat16, {}),
        (4, torch.bfloat16, {"use_dora": True}),
        (4, torch.uint8, {}),
        (8, None, {}),
    ],
    ids=["4bit-lora", "4bit-dora", "4bit-uint8-lora", "8bit-lora"],
)
def test_quantized_lora_layers_are_batched_and_exact(monkeypatch, base_dir, bits, storage, lora):
    """4-bit as Axolotl stores it (codes in bf16) and as transformers does by default (uint8).
    DoRA on 8-bit is not here: PEFT 0.20 with bitsandbytes 0.50.2 fails in its own forward on
    the CPU after the first backward (the weight's int8 scales are dropped)."""
    model = quantized_lora(base_dir, bits, storage, **lora)
    assert quantized_base(model) == (
        f"the base model is quantized: 14 bitsandbytes {LAYOUT[bits, storage]} layers; the mask "
        f"covers the adapter only"
    )
    params = adapter_parameters(model)
    rules = claim_rules(model, params)
    assert {key for rule in rules for key in rule.keys} == set(params)
    assert {type(rule) for rule in rules} == (
        {LinearRule, DoraMagnitudeRule} if lora else {LinearRule}
    )
    no_per_example_loop(monkeypatch)
    batches = padded_batches(n_rows=7, batch_size=3)
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    for layer in four_bit_layers(model):  # the reference (eval mode) must not repack either
        layer.support_avx512bf16_for_cpu = False
    reference = reference_fisher(model, batches, params, num_samples=7)
    assert max_relative_error(result.scores, reference) < 1e-4
    assert all(float(score.max()) > 0 for key, score in result.scores.items() if "lora_B" in key)


def test_a_dense_model_has_no_quantized_base_line():
    assert quantized_base(tiny_lora_model("llama")) is None


def test_the_pass_leaves_the_4bit_base_as_loaded(base_dir):
    """On a CPU with AVX512-BF16 (claimed here for every layer, so any CPU takes that path) an
    eval-mode forward of a 4-bit linear on an input without gradient repacks its weight in
    place for an inference kernel, rounding its scales to bf16. The pass runs in eval mode: it
    must not change the base the run then trains (nor the DoRA norms it reads)."""
    model = quantized_lora(base_dir, 4, use_dora=True)
    layers = four_bit_layers(model)
    assert {layer.weight.quant_state.nested for layer in layers} == {True}  # as Axolotl loads
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    before = [stored(layer) for layer in layers]
    params = adapter_parameters(model)
    fisher_scores(model, padded_batches(n_rows=7, batch_size=3), params, 7, progress=False)
    for layer, (weight, absmax) in zip(layers, before, strict=True):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        codes, scales = stored(layer)
        assert torch.equal(codes, weight) and torch.equal(scales, absmax)
