"""The batched Fisher pass's recording: each rule's calls, handed to the rule during backward.

Forward hooks on the modules of the batched rules (`fisher_rules`) record each call's input and
pass its output through a tap: an identity whose backward receives the output's gradient. A
rule adds its examples' squared gradients as soon as every call it recorded has its gradient,
and the calls are then dropped, so each layer's recorded input and output gradient live only
until backward has passed it (as a training backward frees each layer's), not until the end.
Outputs are kept only for rules that read them (`FisherRule.needs_output`). Inside a decoder
layer that recomputes its forward in backward (`layer_checkpointing`), a call's input (and
output) is recorded when backward recomputes it, not in the first forward, so the recorded
inputs of only one layer are alive at a time, as a checkpointed training step's activations.

Every tap also takes one scalar leaf, the anchor. Asking autograd for the anchor's gradient runs
the backward along every path to a tap and no further: no weight gradient is formed and autograd
keeps no output's gradient.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

import torch
from torch import nn

from axolotl_fish.base.sharded import is_sharded
from axolotl_fish.fisher.checkpointing import current_region, recomputed_modules
from axolotl_fish.fisher.rules import Call, FisherRule, claim_rules

LOG = logging.getLogger(__name__)


class _GradientTap(torch.autograd.Function):
    """The output itself (a view) in forward; in backward, the output's gradient goes to
    `receive` and on, unchanged."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        output: torch.Tensor,
        anchor: torch.Tensor,
        receive: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        ctx.receive = receive
        return output.view_as(output)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        ctx.receive(grad.detach())
        return grad, None, None


class RuleTaps:
    """Records the calls of every batched rule's modules while `accumulate` runs its forward."""

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        self.model = model
        self.rules = claim_rules(model, params) if params else []
        self.params = params
        self._rules_of: dict[nn.Module, list[FisherRule]] = defaultdict(list)
        for rule in self.rules:
            for module in rule.modules:
                self._rules_of[module].append(rule)
        # Before FSDP2's own forward hook: the pre-backward hook it puts on the output (gathering
        # a module it sharded on its own, as Axolotl shards LoRA factors, DoRA magnitudes and
        # LoRA embeddings) then fires before the tap hands the output's gradient to a rule.
        self._handles = {
            module: module.register_forward_hook(self._record, prepend=True)
            for module in self._rules_of
        }
        # Per module, its calls of the current micro-batch: [input, output (only where a rule
        # needs it), output gradient].
        self._calls: dict[nn.Module, list[list[torch.Tensor | None]]] = defaultdict(list)
        self._waiting: dict[FisherRule, int] = {}
        # Modules recorded when backward recomputes them; per (module, layer call), the indices
        # of its calls still waiting for their recomputation, in call order.
        self._recomputed: set[nn.Module] = set()
        self._pending: dict[tuple[nn.Module, int], deque[int | None]] = defaultdict(deque)
        self._in_backward = False
        self._adding = False  # a rule's `add` runs (it may call its module: not a recomputation)
        self._anchor: torch.Tensor | None = None
        self._rows = 0
        self._scores: dict[str, torch.Tensor] = {}
        self._dropped: dict[str, nn.Parameter] = {}

    @property
    def covered(self) -> set[str]:
        return {key for rule in self.rules for key in rule.keys}

    def _record(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        if self._in_backward:
            if not self._adding:
                self._record_recomputed(module, args[0], output)
            return None
        if self._anchor is None:
            return None
        region = current_region()
        deferred = module in self._recomputed and region is not None
        if not output.requires_grad:  # no tap; the recomputation repeats the call all the same
            if deferred:
                self._pending[module, region].append(None)
            return None
        calls = self._calls[module]
        if deferred:
            calls.append([None, None, None])  # filled in when backward recomputes the call
            self._pending[module, region].append(len(calls) - 1)
        else:
            calls.append([args[0].detach(), self._output_if_needed(module, output), None])
        index = len(calls) - 1
        return _GradientTap.apply(output, self._anchor, lambda g: self._receive(module, index, g))

    def _output_if_needed(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        needed = any(rule.needs_output for rule in self._rules_of[module])
        return output.detach() if needed else None

    def _record_recomputed(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        """A call of the first forward, recomputed in backward: its input (and output) now."""
        pending = self._pending.get((module, current_region()))
        index = pending.popleft() if pending else None
        calls = self._calls.get(module)
        if index is None or calls is None:
            return  # a call without a tap, a module not recorded here, or no rule waits
        calls[index][0], calls[index][1] = x.detach(), self._output_if_needed(module, output)
        self._arrived(module)

    def accumulate(
        self, forward: Callable[[], torch.Tensor], scores: dict[str, torch.Tensor]
    ) -> dict[str, nn.Parameter]:
        """Run `forward` (returning per-row losses) recording the calls, backpropagate once,
        and add every row's squared gradients to `scores`. Rules whose calls turn out not to be
        per example are dropped; their tensors are returned, for the generic path."""
        self._scores, self._dropped = scores, {}
        device = next(iter(self.params.values())).device
        self._recomputed = recomputed_modules(self.model) & set(self._rules_of)
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        try:
            loss = forward()
            self._anchor, anchor = None, self._anchor  # nothing more is recorded
            self._rows = loss.shape[0]
            self._waiting = {  # a gradient per call, and an input per call recomputed
                rule: sum(
                    len(self._calls[module]) * (2 if module in self._recomputed else 1)
                    for module in rule.modules
                )
                for rule in self.rules
            }
            self._in_backward = True
            torch.autograd.grad(loss.sum(), anchor, allow_unused=True)
            self._in_backward = False
            for rule in [rule for rule, waiting in self._waiting.items() if waiting > 0]:
                self._add(rule)  # some of its calls' outputs did not reach the loss
        finally:
            self._anchor = None
            self._in_backward = False
            self._calls.clear()
            self._pending.clear()
            self._waiting = {}
        return self._dropped

    def _receive(self, module: nn.Module, index: int, grad: torch.Tensor) -> None:
        self._calls[module][index][2] = grad
        self._arrived(module)

    def _arrived(self, module: nn.Module) -> None:
        """One of a module's calls got its gradient or its recomputed input."""
        for rule in self._rules_of[module]:
            if rule in self._waiting:
                self._waiting[rule] -= 1
                if self._waiting[rule] == 0:
                    self._add(rule)

    def _add(self, rule: FisherRule) -> None:
        """Add one rule's examples (its calls with a gradient), then drop the calls of every
        module no rule still waits for."""
        del self._waiting[rule]
        calls = {
            module: [Call(x, out, g) for x, out, g in self._calls[module] if g is not None]
            for module in rule.modules
        }
        if any(call.input is None for module_calls in calls.values() for call in module_calls):
            raise RuntimeError(
                f"Fisher pass: backward did not recompute every call of {rule.keys}; their "
                f"inputs are unknown. Turn gradient checkpointing off for this model."
            )
        if not rule.per_example(calls, self._rows):
            LOG.info(f"Fisher pass: {rule.keys} are not used per example; generic path")
            self._drop(rule)
        elif any(calls.values()):
            check_gathered(rule)
            self._adding = True
            try:
                rule.add(calls, self._scores)
            finally:
                self._adding = False
        for module in rule.modules:
            if not any(other in self._waiting for other in self._rules_of.get(module, ())):
                self._calls.pop(module, None)

    def _drop(self, rule: FisherRule) -> None:
        """Hand a rule's tensors to the generic path for good: its modules stop being recorded,
        unless another rule still reads them."""
        self.rules.remove(rule)
        self._dropped |= {key: self.params[key] for key in rule.keys}
        for module in rule.modules:
            self._rules_of[module].remove(rule)
            if not self._rules_of[module]:
                del self._rules_of[module]
                self._handles.pop(module).remove()

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()


def check_gathered(rule: FisherRule) -> None:
    """A rule that reads parameter values needs them whole: under FSDP2, only while its layer
    is gathered (during its backward, not after: calls whose output never reached the loss)."""
    if rule.reads_values and any(is_sharded(p) for p in rule.values_read()):
        raise RuntimeError(
            f"Fisher pass: {rule.keys} are scored from their values, which FSDP2 has resharded "
            f"by the time their gradient arrived. Score before sharding "
            f"(fish_mask.score_after_sharding: false) or leave them out (fish_mask.exclude)."
        )
