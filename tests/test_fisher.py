"""The batched Fisher pass equals an independent batch-size-1 reference loop."""

from __future__ import annotations

import pytest
import torch
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.fisher.scores import fisher_scores, label_losses, sampled_targets


def reference_fisher(model, batches, params, num_samples):
    """Peers' loop: one example at a time, HF's own loss (mean over label tokens), grad squared."""
    model.eval()
    keys = list(params)
    scores = {key: torch.zeros_like(p) for key, p in params.items()}
    seen = 0
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            if seen == num_samples:
                break
            row = {k: v[n : n + 1] for k, v in batch.items()}
            loss = model(**row).loss
            grads = torch.autograd.grad(loss, [params[k] for k in keys])
            for key, grad in zip(keys, grads, strict=True):
                scores[key] += grad.square()
            seen += 1
    model.train()
    return {key: score / seen for key, score in scores.items()}


def max_relative_error(scores, reference):
    """Each tensor's largest error over its largest reference score; where the reference is all
    0 (e.g. lora_A while lora_B = 0), the largest score itself."""
    return max(
        float((scores[k] - reference[k]).abs().max() / (reference[k].abs().max() or 1.0))
        for k in reference
    )


def assert_matches_reference(model, batches, num_samples):
    """The batched pass over all adapter tensors equals the batch-size-1 reference loop."""
    params = adapter_parameters(model)
    result = fisher_scores(model, batches, params, num_samples=num_samples, progress=False)
    reference = reference_fisher(model, batches, params, num_samples=num_samples)
    assert max_relative_error(result.scores, reference) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batched", [True, False])
def test_matches_batch_size_one_reference(arch, batched):
    model = tiny_lora_model(arch)
    params = adapter_parameters(model)
    batches = padded_batches(n_rows=11, batch_size=4)
    result = fisher_scores(model, batches, params, num_samples=9, batched=batched, progress=False)
    reference = reference_fisher(model, batches, params, num_samples=9)
    assert result.num_examples == 9
    assert set(result.scores) == set(reference)
    assert max_relative_error(result.scores, reference) < 1e-4
    assert all(float(s.min()) >= 0 for s in result.scores.values())


@pytest.mark.parametrize(("arch", "embedding"), [("llama", "embed_tokens"), ("gpt2", "wte")])
def test_embedding_factors_match_reference(arch, embedding):
    model = tiny_lora_model(arch, extra_targets=(embedding,))
    assert any("lora_embedding_A" in key for key in adapter_parameters(model))
    batches = padded_batches(n_rows=9, batch_size=4)
    for batch in batches:  # id 0 (the Llama's padding_idx) inside real text: its row gets no grad
        batch["input_ids"][:, 2] = 0
    assert_matches_reference(model, batches, 9)


@pytest.mark.parametrize("extra", [(), ("embed_tokens",)])
def test_batched_covers_lora_and_embedding_factors_without_per_example_loop(monkeypatch, extra):
    import axolotl_fish.fisher.scores as fisher

    def forbidden(*args, **kwargs):
        raise AssertionError("plain LoRA factors must not take the per-example path")

    monkeypatch.setattr(fisher, "_accumulate_rowwise", forbidden)
    model = tiny_lora_model("llama", extra_targets=extra)
    params = adapter_parameters(model)
    fisher_scores(model, padded_batches(8, 4), params, num_samples=8, progress=False)


def test_packed_rows_are_examples():
    """With sample packing a row holds several sequences (position_ids restart); the batched
    pass treats each packed row as one example, exactly as a batch-size-1 loop over rows does."""
    model = tiny_lora_model("llama")
    batches = padded_batches(n_rows=8, batch_size=4)
    for batch in batches:
        width = batch["input_ids"].shape[1]
        half = width // 2
        batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(width - half)]).repeat(
            batch["input_ids"].shape[0], 1
        )
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_matches_reference(model, batches, 8)


@pytest.mark.parametrize(
    ("settings", "key_part"),
    [({"use_dora": True}, "lora_magnitude_vector"), ({"modules_to_save": ["lm_head"]}, "lm_head")],
    ids=["dora", "modules_to_save"],
)
def test_tensors_outside_plain_lora_factors_match_the_reference(settings, key_part):
    """DoRA magnitudes and factors, modules_to_save copies."""
    model = tiny_lora_model("llama", **settings)
    assert any(key_part in key for key in adapter_parameters(model))
    assert_matches_reference(model, padded_batches(n_rows=6, batch_size=3), 6)


def test_label_losses_are_each_rows_own_mean():
    model = tiny_lora_model("llama").eval()
    batch = padded_batches(n_rows=3, batch_size=3)[0]
    with torch.no_grad():
        logits = model(**batch).logits
        losses, has_labels = label_losses(logits[:, :-1], batch["labels"][:, 1:])
        for n in range(3):
            row = {k: v[n : n + 1] for k, v in batch.items()}
            assert torch.allclose(losses[n], model(**row).loss, atol=1e-5)
    assert has_labels.all()


def test_dropout_off_grads_untouched_training_mode_restored():
    model = tiny_lora_model("llama")  # lora_dropout=0.1
    model.train()
    params = adapter_parameters(model)
    batches = padded_batches(8, 4)
    first = fisher_scores(model, batches, params, num_samples=8, progress=False)
    second = fisher_scores(model, batches, params, num_samples=8, progress=False)
    for key in params:
        assert torch.equal(first.scores[key], second.scores[key]), key
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_rows_without_labels_are_skipped_and_num_samples_is_exact():
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    batches = padded_batches(12, 4)
    batches[0]["labels"][1] = -100  # this row carries no label token
    result = fisher_scores(model, batches, params, num_samples=6, progress=False)
    kept = [{k: v[[0, 2, 3]] for k, v in batches[0].items()}, batches[1]]
    reference = reference_fisher(model, kept, params, num_samples=6)
    assert result.num_examples == 6
    assert max_relative_error(result.scores, reference) < 1e-4


def test_rng_and_shuffled_order_unchanged():
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    batch = padded_batches(8, 8)[0]
    rows = [{k: v[n] for k, v in batch.items()} for n in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fisher_scores(model, loader, params, num_samples=4, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_no_labelled_example_is_an_error():
    model = tiny_lora_model("llama")
    batch = padded_batches(2, 2)[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no example with label tokens"):
        fisher_scores(model, [batch], adapter_parameters(model), num_samples=2, progress=False)


def test_sampled_fisher_batched_matches_reference_and_is_seeded():
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    batches = padded_batches(10, 4)

    def run(seed, batched=True):
        return fisher_scores(
            model, batches, params, 10, sampled_labels_seed=seed, batched=batched, progress=False
        ).scores

    sampled = run(5)
    assert max_relative_error(sampled, run(5, batched=False)) < 1e-4
    assert max_relative_error(sampled, run(5)) == 0
    assert max_relative_error(sampled, run(6)) > 1e-3
    empirical = fisher_scores(model, batches, params, 10, progress=False).scores
    assert max_relative_error(sampled, empirical) > 1e-3


def test_sampled_targets_draw_only_at_label_positions_from_the_model():
    targets = torch.tensor([[-100, 4, 5, -100], [3, 3, 3, 3]])
    positions = torch.arange(4)
    logits = torch.full((2, 4, 10), -30.0)
    logits[..., 7] = 30.0  # the model is certain of token 7 everywhere
    sampled = sampled_targets(logits, targets, positions, first_index=0, seed=0)
    assert sampled.tolist() == [[-100, 7, 7, -100], [7, 7, 7, 7]]
    uniform = sampled_targets(torch.zeros(2, 4, 10), targets, positions, first_index=0, seed=0)
    assert (uniform == -100).equal(targets == -100)
    assert len(set(uniform[1].tolist())) > 1
    # Keeping fewer positions does not change the draws at the kept ones.
    kept = torch.tensor([1, 3])
    some = sampled_targets(torch.zeros(2, 2, 10), targets[:, kept], kept, first_index=0, seed=0)
    assert some.equal(uniform[:, kept])


def test_more_samples_than_data_uses_all_and_warns(caplog):
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    batches = padded_batches(6, 4)
    result = fisher_scores(model, batches, params, num_samples=50, progress=False)
    assert result.num_examples == 6
    assert "ran out after 6 of 50 examples" in caplog.text
