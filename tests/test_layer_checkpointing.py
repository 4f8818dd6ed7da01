"""Gradient checkpointing during the Fisher pass (`layer_checkpointing`): the pass runs in eval
mode, where transformers does not checkpoint; with checkpointing on, the decoder layers
recompute their forward in backward all the same, and the scores are those of the pass
without it."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_fisher import max_relative_error
from tiny_peft import padded_batches, tiny_base_model, tiny_lora_model
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from axolotl_fish.adapters.tensors import adapter_parameters, trainable_parameters
from axolotl_fish.fisher.checkpointing import (
    checkpointed_layers,
    checkpointing_enabled,
    decoder_layers,
)
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.fisher.taps import RuleTaps
from axolotl_fish.training.warmup import dense_warmup

BATCHES = padded_batches(n_rows=8, batch_size=4)


def count_attention_calls(model: nn.Module) -> list[int]:
    """A counter of the first decoder layer's attention forwards (recomputation included)."""
    calls = [0]
    attention = next(m for m in model.modules() if isinstance(m, LlamaDecoderLayer)).self_attn
    attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-example"])
def test_with_checkpointing_on_the_pass_recomputes_layers_and_scores_as_without(reentrant, batched):
    """Also when the model's own checkpoint is reentrant, which would run the first forward
    without gradient: the pass uses a non-reentrant one instead."""
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    calls = count_attention_calls(model)
    plain = fisher_scores(model, BATCHES, params, 8, batched=batched, progress=False).scores
    without = calls[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls[0] = 0
    checked = fisher_scores(model, BATCHES, params, 8, batched=batched, progress=False).scores
    assert calls[0] == 2 * without  # every forward ran again in backward
    assert max_relative_error(checked, plain) < 1e-5
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))  # restored


def test_full_parameter_scores_with_layers_checkpointed_by_request():
    """The Trainer turns checkpointing on only when training starts (after the pass, in
    full-parameter mode): the plugin asks for it with `checkpointed_layers`."""
    model = tiny_base_model("llama")
    params = trainable_parameters(model)
    calls = count_attention_calls(model)
    plain = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    without = calls[0]
    with checkpointed_layers(model) as layers:
        checked = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    assert layers == 2 and calls[0] == 3 * without
    assert max_relative_error(checked, plain) < 1e-5


def test_nested_use_and_checkpoint_wrappers_are_restored_afterwards():
    model = tiny_base_model("llama")
    with checkpointed_layers(model) as outer:
        with checkpointed_layers(model) as inner:
            assert (outer, inner) == (2, 0)
        assert all("forward" in vars(layer) for layer in decoder_layers(model))
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))
    wrap_layers(model)  # FSDP2's activation checkpointing
    assert decoder_layers(model) == [] and checkpointing_enabled(model)
    wrappers = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    own = [wrapper.checkpoint_fn for wrapper in wrappers]
    with checkpointed_layers(model) as layers:
        assert layers == 2 and all(
            w.checkpoint_fn is not f for w, f in zip(wrappers, own, strict=True)
        )
    assert all(w.checkpoint_fn is f for w, f in zip(wrappers, own, strict=True))


def wrap_layers(model: nn.Module) -> None:
    """Axolotl's `fsdp_config.activation_checkpointing`: non-reentrant `checkpoint_wrapper`s."""
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
    )


def test_a_dense_warm_up_inside_the_context_trains_as_without_it():
    """A warm-up trains in training mode, where transformers checkpoints the layers itself (here
    with its reentrant checkpoint, Axolotl's default): no second checkpoint inside it."""
    warmed = []
    for context in (nullcontext, checkpointed_layers):
        model = tiny_lora_model("llama")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        params = adapter_parameters(model)
        calls = count_attention_calls(model)
        with context(model):
            dense_warmup(model, BATCHES, params, 2, 1e-2, progress=False)
        warmed.append(({key: p.detach().clone() for key, p in params.items()}, calls[0]))
    (plain, plain_calls), (inside, inside_calls) = warmed
    assert inside_calls == plain_calls == 4  # 2 steps, each a forward and its recomputation
    assert all(torch.equal(inside[key], plain[key]) for key in plain)


@pytest.mark.parametrize("checkpointing", ["transformers", "checkpoint_wrapper"])
def test_inputs_are_recorded_when_backward_recomputes_a_layer(monkeypatch, checkpointing):
    """With the layers checkpointed, the pass records a module's input when backward recomputes
    its layer, so the recorded inputs of one layer at most are alive at once (2 layers x 3
    targets x lora_A and lora_B here), as a checkpointed step keeps one layer's activations."""
    alive: list[int] = []
    add = RuleTaps._add

    def counting_add(taps: RuleTaps, rule) -> None:
        alive.append(sum(call[0] is not None for calls in taps._calls.values() for call in calls))
        add(taps, rule)

    monkeypatch.setattr(RuleTaps, "_add", counting_add)
    model = tiny_lora_model("llama")
    params = adapter_parameters(model)
    plain = fisher_scores(model, BATCHES[:1], params, 4, progress=False).scores
    assert max(alive) == 12  # every layer's inputs, recorded in the forward
    alive.clear()
    if checkpointing == "transformers":
        model.gradient_checkpointing_enable()
    else:
        wrap_layers(model)
    checked = fisher_scores(model, BATCHES[:1], params, 4, progress=False).scores
    assert max(alive) == 6  # one layer's
    assert max_relative_error(checked, plain) < 1e-5


@pytest.mark.parametrize(
    "settings",
    [{"use_dora": True}, {"use_dora": True, "extra_targets": ("embed_tokens",)}],
    ids=["dora", "dora+embedding"],
)
def test_rules_that_read_outputs_or_values_score_as_without_checkpointing(settings):
    """DoRA magnitudes read each call's output, recorded at the recomputation too."""
    model = tiny_lora_model("llama", **settings)
    params = adapter_parameters(model)
    plain = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    model.gradient_checkpointing_enable()
    checked = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    assert max_relative_error(checked, plain) < 1e-5


def test_a_layer_called_twice_per_forward_pairs_each_recomputation_with_its_own_call():
    """One decoder layer object used for both layers (weights shared): backward recomputes its
    second call first; each module call is paired by the layer call it belongs to."""
    base = tiny_base_model("llama")
    base.model.layers[1] = base.model.layers[0]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = adapter_parameters(model)
    with torch.no_grad():
        for key, param in params.items():
            if "lora_B" in key:
                param.normal_(std=0.1)
    plain = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    model.gradient_checkpointing_enable()
    checked = fisher_scores(model, BATCHES, params, 8, progress=False).scores
    assert max_relative_error(checked, plain) < 1e-5


def test_a_recomputation_that_stops_early_is_refused_not_scored_without_inputs(monkeypatch):
    """PyTorch's default non-reentrant checkpoint stops recomputing once the saved tensors are
    back, before the layer's last module runs again: that module's input would never come."""
    import axolotl_fish.fisher.checkpointing as layer_checkpointing

    def stopping_early(function, *args, early_stop, **kwargs):
        return checkpoint(function, *args, early_stop=True, **kwargs)

    monkeypatch.setattr(layer_checkpointing, "checkpoint", stopping_early)
    model = tiny_lora_model("llama")
    model.gradient_checkpointing_enable()
    params = adapter_parameters(model)
    with pytest.raises(RuntimeError, match="did not recompute every call of .*lora_B"):
        fisher_scores(model, BATCHES[:1], params, 4, progress=False)
