"""The batched pass's recording: each rule adds its examples during backward, as soon as backward
has passed its layer, and then its recorded tensors are dropped (not kept to the end)."""

from __future__ import annotations

import torch
from tiny_peft import padded_batches, tiny_base_model, tiny_lora_model

import axolotl_fish.fisher.taps as fisher_taps
from axolotl_fish.adapters.tensors import adapter_parameters, trainable_parameters
from axolotl_fish.fisher.rules import LinearRule, NormRule
from axolotl_fish.fisher.scores import fisher_scores


def held_at_each_add(monkeypatch) -> list[tuple[int, int]]:
    """For each rule added: how many modules' recorded calls were held at that moment, and how
    many of those modules were still waiting for an output gradient (backward not past them)."""
    held = []
    add = fisher_taps.RuleTaps._add

    def spy(self, rule):
        waiting = sum(any(g is None for *_, g in calls) for calls in self._calls.values())
        held.append((len(self._calls), waiting))
        return add(self, rule)

    monkeypatch.setattr(fisher_taps.RuleTaps, "_add", spy)
    return held


def test_each_layer_is_added_and_dropped_as_backward_passes_it(monkeypatch):
    model = tiny_lora_model("llama")  # LoRA on q, v, down of 2 layers: 12 factor modules
    held = held_at_each_add(monkeypatch)
    fisher_scores(model, padded_batches(4, 4), adapter_parameters(model), 4, progress=False)
    # One module's calls fewer after every add, and every add but the last came while other
    # layers still waited for their gradient: during backward, not after it.
    assert held == [(n, n - 1) for n in range(12, 0, -1)]


def test_outputs_are_kept_only_for_rules_that_read_them(monkeypatch):
    model = tiny_base_model("llama")
    params = trainable_parameters(model)
    outputs: dict[type, set[bool]] = {LinearRule: set(), NormRule: set()}
    add = fisher_taps.RuleTaps._add

    def spy(self, rule):
        if type(rule) in outputs:
            for module in rule.modules:
                outputs[type(rule)] |= {out is not None for _, out, _ in self._calls[module]}
        return add(self, rule)

    monkeypatch.setattr(fisher_taps.RuleTaps, "_add", spy)
    batches = padded_batches(4, 4)
    scores = fisher_scores(model, batches, params, 4, progress=False).scores
    assert outputs == {LinearRule: {False}, NormRule: {True}}
    assert all(bool(score.isfinite().all()) and float(score.sum()) > 0 for score in scores.values())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
