"""The rule registry of the batched Fisher pass: which tensors each rule claims, and that the
batched numbers equal the batch-size-1 reference without any per-example loop."""

from __future__ import annotations

import pytest
import torch
from test_fisher import max_relative_error, reference_fisher
from tiny_peft import padded_batches, tiny_base_model, tiny_lora_model
from torch import nn

import axolotl_fish.fisher.rules as fisher_rules
import axolotl_fish.fisher.scores as fisher
import axolotl_fish.fisher.taps as fisher_taps
from axolotl_fish.adapters.tensors import adapter_parameters, trainable_parameters
from axolotl_fish.fisher.rules import (
    DoraMagnitudeRule,
    EmbeddingRule,
    LinearRule,
    NormRule,
    TiedEmbeddingRule,
    claim_rules,
    sum_of_squared_outer,
)
from axolotl_fish.fisher.scores import fisher_scores


def no_per_example_loop(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor took the per-example path")

    monkeypatch.setattr(fisher, "_accumulate_rowwise", forbidden)


def batches_with_padding_id_in_text():
    batches = padded_batches(n_rows=7, batch_size=3)
    for batch in batches:  # id 0 (the padding_idx) inside real text: its row gets no gradient
        batch["input_ids"][:, 1] = 0
    return batches


@pytest.mark.parametrize("tied", [False, True])
def test_every_weight_of_a_llama_is_batched_and_exact(monkeypatch, tied):
    model = tiny_base_model("llama")
    if tied:  # SmolLM2: lm_head shares the input embedding
        model.lm_head.weight = model.get_input_embeddings().weight
    params = trainable_parameters(model)
    rules = claim_rules(model, params)
    assert {key for rule in rules for key in rule.keys} == set(params)
    kinds = {type(rule) for rule in rules}
    assert kinds == {LinearRule, NormRule, TiedEmbeddingRule if tied else EmbeddingRule}
    no_per_example_loop(monkeypatch)
    batches = batches_with_padding_id_in_text()
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    reference = reference_fisher(model, batches, params, num_samples=7)
    assert max_relative_error(result.scores, reference) < 1e-4
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("pair_max_tokens", [0, 10_000])
def test_token_pairs_and_per_example_products_both_match_reference(monkeypatch, pair_max_tokens):
    """Every Linear and the tied head through one product only: per-example products (0) or
    the token-pair product (10,000 tokens)."""
    monkeypatch.setattr(fisher_rules, "PAIR_MAX_TOKENS", pair_max_tokens)
    pair_calls = []
    pair_product = fisher_rules._token_pair_product
    monkeypatch.setattr(
        fisher_rules, "_token_pair_product", lambda g, x: pair_calls.append(1) or pair_product(g, x)
    )
    model = tiny_base_model("llama")
    model.lm_head.weight = model.get_input_embeddings().weight
    params = trainable_parameters(model)
    no_per_example_loop(monkeypatch)
    batches = batches_with_padding_id_in_text()
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    assert (len(pair_calls) > 0) == (pair_max_tokens > 0)
    reference = reference_fisher(model, batches, params, num_samples=7)
    assert max_relative_error(result.scores, reference) < 1e-4
    assert all(float(score.min()) >= 0 for score in result.scores.values())


@pytest.mark.parametrize("square_in_place_elements", [0, 1 << 30])
def test_a_bf16_layer_forms_per_example_products_in_bf16(monkeypatch, square_in_place_elements):
    """As autograd forms a bf16 layer's training gradient; squares and sums stay fp32 (whether
    squared in place one example at a time or a block at a time), and the scores match the
    one-example-at-a-time path (autograd's bf16 gradients) to bf16 rounding."""
    monkeypatch.setattr(fisher_rules, "PAIR_MAX_TOKENS", 0)  # every Linear: per-example products
    monkeypatch.setattr(fisher_rules, "SQUARE_IN_PLACE_ELEMENTS", square_in_place_elements)
    model = tiny_base_model("llama").to(torch.bfloat16)
    params = trainable_parameters(model)
    batches = batches_with_padding_id_in_text()
    product_dtypes = set()
    bmm = torch.bmm

    def spy(a, b):
        product_dtypes.add((a.dtype, b.dtype))
        return bmm(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    monkeypatch.setattr(torch, "bmm", bmm)
    assert product_dtypes == {(torch.bfloat16, torch.bfloat16)}
    assert {score.dtype for score in result.scores.values()} == {torch.float32}
    loop = fisher_scores(model, batches, params, num_samples=7, batched=False, progress=False)
    assert max_relative_error(result.scores, loop.scores) < 2e-2


@pytest.mark.parametrize("square_in_place_elements", [0, 1 << 30])
@pytest.mark.parametrize("tokens", [1, 2, 5, 9])  # up to PAIR_MAX_TOKENS: token pairs
def test_sum_of_squared_outer_skips_zero_gradient_tokens_and_equals_a_loop(
    monkeypatch, tokens, square_in_place_elements
):
    """Rows with different numbers of gradient-carrying tokens, scattered among zero-gradient
    ones (padding, prompt); per-example products squared in place or a block at a time."""
    monkeypatch.setattr(fisher_rules, "SQUARE_IN_PLACE_ELEMENTS", square_in_place_elements)
    generator = torch.Generator().manual_seed(tokens)
    g = torch.zeros(3, 12, 5)
    x = torch.randn(3, 12, 4, generator=generator)
    for row in range(3):
        where = torch.randperm(12, generator=generator)[: max(1, tokens - row)]
        g[row, where] = torch.randn(len(where), 5, generator=generator)
    expected = sum((g[n].T @ x[n]).square() for n in range(3))
    torch.testing.assert_close(sum_of_squared_outer(g, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair_max_tokens", [0, 10_000])
def test_tokens_whose_contributions_cancel_give_zero_not_negative(monkeypatch, pair_max_tokens):
    monkeypatch.setattr(fisher_rules, "PAIR_MAX_TOKENS", pair_max_tokens)
    g = torch.tensor([[[1.0, 0.1], [-1.0, -0.1], [0.0, 0.0]]])
    x = torch.tensor([[[3.0], [3.0], [5.0]]])
    result = sum_of_squared_outer(g, x)
    # The token-pair sum cancels to rounding: its sign and size depend on the BLAS kernel (on
    # these inputs it leaves -5e-9 before the clamp); never below 0.
    assert (result >= 0).all()
    torch.testing.assert_close(result, torch.zeros(2, 1), rtol=0, atol=1e-6)


class WithoutLogitsToKeep(nn.Module):
    """A causal LM whose forward does not take `logits_to_keep`: every position's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("sampled_labels_seed", [None, 3])
def test_head_runs_at_label_positions_only_and_equals_every_position(sampled_labels_seed):
    model = tiny_base_model("llama")
    batches = padded_batches(n_rows=7, batch_size=4)
    widths = []
    model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))

    def scores(lm):
        params = trainable_parameters(lm)
        kwargs = {"sampled_labels_seed": sampled_labels_seed, "progress": False}
        return fisher_scores(lm, batches, params, num_samples=7, **kwargs).scores

    kept = scores(model)
    full_widths = [b["input_ids"].shape[1] for b in batches]
    label_positions = [int((b["labels"][:, 1:] != -100).any(dim=0).sum()) for b in batches]
    at_least = [min(fisher.MIN_LOGIT_POSITIONS, width - 1) for width in full_widths]
    assert widths == [max(n, least) for n, least in zip(label_positions, at_least, strict=True)]
    assert all(w < full for w, full in zip(widths, full_widths, strict=True))
    widths.clear()
    every = scores(WithoutLogitsToKeep(model))
    assert widths == full_widths
    every = {key.removeprefix("model."): score for key, score in every.items()}
    assert max_relative_error(kept, every) < 1e-5


def test_gpt2_position_embedding_is_not_per_example_and_goes_generic(monkeypatch):
    """wpe is looked up once for all rows ((1, T) position ids): dropped after the first batch,
    and from then on no longer recorded."""
    model = tiny_base_model("gpt2")
    params = trainable_parameters(model)
    assert "transformer.wpe.weight" in {k for rule in claim_rules(model, params) for k in rule.keys}
    recorded: list[nn.Module] = []
    record = fisher_taps.RuleTaps._record

    def spy(self, module, args, output):
        if self._anchor is not None:  # the batched forward (not the generic path's)
            recorded.append(module)
        return record(self, module, args, output)

    monkeypatch.setattr(fisher_taps.RuleTaps, "_record", spy)
    batches = padded_batches(n_rows=5, batch_size=3)
    result = fisher_scores(model, batches, params, num_samples=5, progress=False)
    assert recorded.count(model.transformer.wpe) == 1  # two micro-batches
    assert recorded.count(model.transformer.wte) == 2
    reference = reference_fisher(model, batches, params, num_samples=5)
    assert max_relative_error(result.scores, reference) < 1e-4


class Bottleneck(nn.Module):
    """A bottleneck adapter of plain nn.Linear layers, added to a block's output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, 4), nn.Linear(4, dim)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.relu(self.down(hidden)))


def test_plain_linear_layers_of_any_adapter_are_claimed(monkeypatch):
    model = tiny_base_model("llama").requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp.adapter = Bottleneck(32)
        layer.mlp.register_forward_hook(lambda module, args, out: module.adapter(out))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 8 and all(type(r) is LinearRule for r in claim_rules(model, params))
    no_per_example_loop(monkeypatch)
    batches = padded_batches(n_rows=6, batch_size=3)
    result = fisher_scores(model, batches, params, num_samples=6, progress=False)
    assert max_relative_error(result.scores, reference_fisher(model, batches, params, 6)) < 1e-4


@pytest.mark.parametrize(
    ("arch", "zero_magnitude"), [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)]
)
def test_dora_linear_layers_are_batched(monkeypatch, arch, zero_magnitude):
    """Factors as linear layers, magnitudes by their own rule; GPT-2's Conv1D base layers store
    the weight transposed (PEFT's fan_in_fan_out); a magnitude entry at 0 (the slope cannot be
    divided out of the output there)."""
    model = tiny_lora_model(arch, use_dora=True)
    params = adapter_parameters(model)
    if zero_magnitude:
        with torch.no_grad():
            next(p for key, p in params.items() if "lora_magnitude_vector" in key)[3] = 0.0
    rules = claim_rules(model, params)
    magnitudes = {key for key in params if "lora_magnitude_vector" in key}
    assert {k for r in rules if type(r) is DoraMagnitudeRule for k in r.keys} == magnitudes
    assert {k for r in rules for k in r.keys} == set(params)
    no_per_example_loop(monkeypatch)
    batches = padded_batches(n_rows=6, batch_size=3)
    result = fisher_scores(model, batches, params, num_samples=6, progress=False)
    assert max_relative_error(result.scores, reference_fisher(model, batches, params, 6)) < 1e-4


@pytest.mark.parametrize(
    ("arch", "dora", "embed_scale", "zero_magnitude"),
    [
        ("llama", True, None, False),
        ("gpt2", True, None, False),
        ("llama", True, None, True),
        ("llama", True, 3.0, False),
        ("llama", False, 3.0, False),
    ],
    ids=["dora", "dora-gpt2", "dora-magnitude-at-0", "dora-scaled", "lora-scaled"],
)
def test_lora_and_dora_embeddings_are_batched(monkeypatch, arch, dora, embed_scale, zero_magnitude):
    """LoRA and DoRA on the input embedding (Llama's with a padding_idx, looked up inside the
    text too; GPT-2's without), a scaled embedding as Gemma's (PEFT scales the adapter's output
    too), and DoRA magnitude entries at 0 (the slope is formed, not divided out)."""
    embedding = "wte" if arch == "gpt2" else "embed_tokens"
    model = tiny_lora_model(
        arch, extra_targets=(embedding,), embed_scale=embed_scale, use_dora=dora
    )
    params = adapter_parameters(model)
    on_embedding = {key for key in params if f"{embedding}." in key}
    assert len(on_embedding) == (3 if dora else 2)
    with torch.no_grad():  # PEFT starts lora_embedding_A at 0: B's scores would all be 0
        params[next(k for k in on_embedding if "lora_embedding_A" in k)].normal_(std=0.1)
    if zero_magnitude:
        with torch.no_grad():
            params[next(k for k in on_embedding if "magnitude" in k)][1::3] = 0.0
    assert {k for r in claim_rules(model, params) for k in r.keys} == set(params)
    no_per_example_loop(monkeypatch)
    batches = batches_with_padding_id_in_text()
    result = fisher_scores(model, batches, params, num_samples=7, progress=False)
    assert max_relative_error(result.scores, reference_fisher(model, batches, params, 7)) < 1e-4


def test_a_layer_that_is_not_affine_in_its_weight_is_refused():
    class SquaredRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.full((32,), 0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight.square()

    model = tiny_base_model("llama").requires_grad_(False)
    model.model.norm = SquaredRMSNorm()
    params = {"model.norm.weight": model.model.norm.weight}
    with pytest.raises(RuntimeError, match="SquaredRMSNorm is not affine"):
        fisher_scores(model, padded_batches(3, 3), params, num_samples=3, progress=False)
