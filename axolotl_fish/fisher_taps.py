"""The batched Fisher pass's recording: each rule's calls, handed to the rule during backward.

Forward hooks on the modules of the batched rules (`fisher_rules`) record each call's input and
pass its output through a tap: an identity whose backward receives the output's gradient. A
rule adds its examples' squared gradients as soon as every call it recorded has its gradient,
and the calls are then dropped, so each layer's recorded input and output gradient live only
until backward has passed it (as a training backward frees each layer's), not until the end.
Outputs are kept only for rules that read them (`FisherRule.needs_output`).

Every tap also takes one scalar leaf, the anchor. Asking autograd for the anchor's gradient runs
the backward along every path to a tap and no further: no weight gradient is formed and autograd
keeps no output's gradient.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import nn

from axolotl_fish.fisher_rules import Call, FisherRule, claim_rules
from axolotl_fish.sharded import is_sharded

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
        if self._anchor is None or not output.requires_grad:
            return None
        calls = self._calls[module]
        needed = any(rule.needs_output for rule in self._rules_of[module])
        kept = output.detach() if needed else None
        calls.append([args[0].detach(), kept, None])
        index = len(calls) - 1
        return _GradientTap.apply(output, self._anchor, lambda g: self._receive(module, index, g))

    def accumulate(
        self, forward: Callable[[], torch.Tensor], scores: dict[str, torch.Tensor]
    ) -> dict[str, nn.Parameter]:
        """Run `forward` (returning per-row losses) recording the calls, backpropagate once,
        and add every row's squared gradients to `scores`. Rules whose calls turn out not to be
        per example are dropped; their tensors are returned, for the generic path."""
        self._scores, self._dropped = scores, {}
        device = next(iter(self.params.values())).device
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        try:
            loss = forward()
            self._anchor, anchor = None, self._anchor  # nothing more is recorded
            self._rows = loss.shape[0]
            self._waiting = {
                rule: sum(len(self._calls[module]) for module in rule.modules)
                for rule in self.rules
            }
            torch.autograd.grad(loss.sum(), anchor, allow_unused=True)
            for rule in [rule for rule, waiting in self._waiting.items() if waiting > 0]:
                self._add(rule)  # some of its calls' outputs did not reach the loss
        finally:
            self._anchor = None
            self._calls.clear()
            self._waiting = {}
        return self._dropped

    def _receive(self, module: nn.Module, index: int, grad: torch.Tensor) -> None:
        self._calls[module][index][2] = grad
        for rule in self._rules_of[module]:
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
        if not rule.per_example(calls, self._rows):
            LOG.info(f"Fisher pass: {rule.keys} are not used per example; generic path")
            self._drop(rule)
        elif any(calls.values()):
            check_gathered(rule)
            rule.add(calls, self._scores)
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
