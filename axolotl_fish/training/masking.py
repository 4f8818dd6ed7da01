"""Train only the selected entries: gradient masks plus a guard against optimizer drift.

A zero gradient is not enough to freeze an entry: AdamW's decoupled weight decay still shrinks
it, and stale optimizer moments would move it. So unselected entries get a zero gradient during
backward (before gradient clipping, so the clip norm counts only trainable entries) and are put
back to their initial values after every optimizer step. Tensors with no selected entry stop
requiring gradients before the optimizer is built, so they cost no optimizer state at all.

Under FSDP2 each rank masks, snapshots and restores only its own slice of every parameter
(`axolotl_fish.base.sharded`); `bind` moves the hooks to the sharded parameters once they exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from axolotl_fish.base.sharded import local_mask, local_part


class GradientMask:
    """Applies boolean masks (True = trainable) to the parameters they are keyed like."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]):
        self._partial: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        # Full masks, True = frozen; each rank's slice of them is cut in `bind`.
        self._frozen = {key: ~masks[key].to(torch.bool) for key in partly_selected(params, masks)}
        self._unselected = [key for key in params if not masks[key].any()]
        self.bind(params)

    def bind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Hook these parameter objects (same keys as at construction). Call again when a wrapper
        replaced them (FSDP2's `fully_shard`); a no-op while they are still the same objects."""
        if self._partial and all(params[key] is p for key, (p, _) in self._partial.items()):
            return
        trains = [key for key in self._unselected if params[key].requires_grad]
        if trains:
            raise RuntimeError(
                f"fish_mask: tensor {trains[0]!r} has no selected entry but requires gradients "
                f"again after the model was wrapped; it would train densely."
            )
        self.remove()
        self._partial = {
            key: (params[key], local_mask(frozen, params[key]))
            for key, frozen in self._frozen.items()
        }
        for param, frozen in self._partial.values():
            self._handles.append(param.register_post_accumulate_grad_hook(_zero_grad_at(frozen)))

    def snapshot(self) -> None:
        """Record the values the frozen entries must keep (call once training weights are final,
        i.e. after a checkpoint was loaded)."""
        self._initial = {
            key: local_part(p).detach().clone() for key, (p, _) in self._partial.items()
        }

    @torch.no_grad()
    def restore(self) -> None:
        """Put frozen entries back to their snapshot values (call after each optimizer step)."""
        for key, (param, frozen) in self._partial.items():
            local = local_part(param)
            torch.where(frozen, self._initial[key], local, out=local)  # one kernel, no temporary

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
        local_part(param.grad).masked_fill_(frozen, 0.0)

    return hook
