"""Train only the selected entries: gradient masks plus a guard against optimizer drift.

A zero gradient is not enough to freeze an entry: AdamW's decoupled weight decay still shrinks
it, and stale optimizer moments would move it. So unselected entries get a zero gradient during
backward (before gradient clipping, so the clip norm counts only trainable entries) and are put
back to their initial values after every optimizer step. Tensors with no selected entry stop
requiring gradients before the optimizer is built, so they cost no optimizer state at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class GradientMask:
    """Applies boolean masks (True = trainable) to the parameters they are keyed like."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
        self._partial: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for key, param in partly_selected(params, masks).items():
            frozen = ~masks[key].to(device=param.device, dtype=torch.bool)
            self._partial[key] = (param, frozen)
            self._handles.append(param.register_post_accumulate_grad_hook(_zero_grad_at(frozen)))

    def snapshot(self) -> None:
        """Record the values the frozen entries must keep (call once training weights are final,
        i.e. after a checkpoint was loaded)."""
        self._initial = {key: p.detach().clone() for key, (p, _) in self._partial.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put frozen entries back to their snapshot values (call after each optimizer step)."""
        for key, (param, frozen) in self._partial.items():
            param.copy_(torch.where(frozen, self._initial[key], param))

    def remove(self) -> None:
        """Detach the gradient hooks (requires_grad changes stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def partly_selected(
    params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]
) -> dict[str, nn.Parameter]:
    """The tensors with some but not all entries selected; tensors with none stop requiring
    gradients here (so an optimizer built afterwards holds no state for them)."""
    partly = {}
    for key, param in params.items():
        if not masks[key].any():
            param.requires_grad_(False)
        elif not masks[key].all():
            partly[key] = param
    return partly


def _zero_grad_at(frozen: torch.Tensor) -> Callable[[nn.Parameter], None]:
    def hook(param: nn.Parameter) -> None:
        # masked_fill, not multiplication: inf * 0 would be NaN.
        param.grad.masked_fill_(frozen, 0.0)

    return hook
