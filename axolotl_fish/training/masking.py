"""Train only the selected entries: gradient masks plus a guard against optimizer drift.

A zero gradient is not enough to freeze an entry: AdamW's decoupled weight decay still shrinks
it, and stale optimizer moments would move it. So unselected entries get a zero gradient at the
end of every backward pass (before gradient clipping, so the clip norm counts only trainable
entries) and are put back to their initial values after every optimizer step. Tensors with no
selected entry stop requiring gradients before the optimizer is built, so they cost no optimizer
state at all.

The cost of a step does not grow with the number of masked tensors: `FrozenEntries` handles the
frozen entries of many tensors per group (one dtype and device, at most `GROUP_BYTES`) with a
fixed number of operators: `torch._foreach_copy_` of the group into a flat scratch buffer, one
`masked_fill_` (gradients) or `torch.where` (restore) over the buffer, `torch._foreach_copy_`
back. A fill and a select, not a multiplication by 0/1: an inf or NaN gradient at a frozen entry
becomes 0 (inf * 0 would be NaN, and a NaN clip norm turns every weight into NaN), and restored
entries are bitwise their snapshot, whatever the optimizer wrote there. Memory: the snapshot and
the scratch buffer, each the size of the partly masked tensors (the buffer at most `GROUP_BYTES`
per dtype and device), and a bool mask (1 byte per entry).

`GradientMask` masks gradients once per backward pass, when it ends: each tensor's
post-accumulate-grad hook only queues (once) a callback on the autograd engine, which queues the
masking behind the callbacks queued during backward (DDP's, which copies the all-reduced buckets
into `.grad`; FSDP2's, which waits for the reduce-scatter of the sharded gradients). Under
reentrant gradient checkpointing (Axolotl's default) a parameter's gradient arrives in a nested
backward run by a checkpointed layer's backward; the masking then waits for the outermost one.

Under FSDP2 each rank masks, snapshots and restores only its own slice of every parameter
(`axolotl_fish.base.sharded`); `bind` moves the hooks to the sharded parameters once they exist.

Grouped API, for callers that hold the tensors themselves (e.g. a launcher's fp32 master
slices); `tensors` are the same tensors (or ones of the same shapes, dtype and device) in the
same order at every call:

    entries = FrozenEntries(tensors, frozen)  # bool masks shaped like tensors, True = frozen
    entries.snapshot(tensors)                 # remember the frozen entries' values
    entries.zero_(grads)                      # zero the frozen entries (None items are skipped)
    entries.restore_(tensors)                 # put the frozen entries back, bitwise
    entries.zero_one_(i, grad)                # one tensor alone, e.g. in its own gradient hook

`GradientMask(..., each_gradient=True)` zeroes each gradient in its own hook instead (one
operator per tensor), where a launcher's hooks registered after ours take the gradient away at
once: DeepSpeed copies it into its reduction buckets, so masking at the end of backward would
come too late.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from axolotl_fish.base.sharded import local_mask, local_part, local_parts

# A group's scratch buffer holds at most this much (one tensor larger than it is a group alone),
# so a dense full-parameter mask does not double the weights' memory.
GROUP_BYTES = 256 << 20


class _Group:
    """Tensors of one dtype and device: their flat frozen mask, the scratch buffer's views."""

    def __init__(
        self,
        positions: list[int],
        tensors: Sequence[torch.Tensor],
        frozen: Sequence[torch.Tensor],
        scratch: torch.Tensor,
    ) -> None:
        self.positions = positions
        sizes = [tensors[i].numel() for i in positions]
        self.flat = scratch[: sum(sizes)]
        pieces = self.flat.split(sizes)
        self.views = [
            piece.view(tensors[i].shape) for i, piece in zip(positions, pieces, strict=True)
        ]
        device = scratch.device
        self.frozen = torch.cat([frozen[i].to(device, torch.bool).reshape(-1) for i in positions])
        masks = self.frozen.split(sizes)
        self.masks = [m.view(tensors[i].shape) for i, m in zip(positions, masks, strict=True)]
        self.initial: torch.Tensor | None = None

    def gather(self, tensors: Sequence[torch.Tensor | None]) -> tuple[list, list]:
        """This group's tensors that are not None, and their scratch views."""
        pairs = [
            (tensors[i], v)
            for i, v in zip(self.positions, self.views, strict=True)
            if tensors[i] is not None
        ]
        return [t for t, _ in pairs], [v for _, v in pairs]


class FrozenEntries:
    """The frozen entries (`frozen[i]` True) of `tensors`, zeroed or restored per group of
    tensors with a fixed number of operators (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor], frozen: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(frozen):
            raise ValueError(f"{len(tensors)} tensors but {len(frozen)} frozen masks.")
        for i, (tensor, mask) in enumerate(zip(tensors, frozen, strict=True)):
            if mask.shape != tensor.shape:
                raise ValueError(
                    f"frozen mask {i} has shape {tuple(mask.shape)}, its tensor "
                    f"{tuple(tensor.shape)}."
                )
        grouped: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
        filled: dict[tuple[torch.dtype, torch.device], int] = {}  # bytes in the last group
        for i, tensor in enumerate(tensors):
            kind = (tensor.dtype, tensor.device)
            groups = grouped.setdefault(kind, [[]])
            if groups[-1] and filled[kind] + tensor.nbytes > GROUP_BYTES:
                groups.append([])
                filled[kind] = 0
            groups[-1].append(i)
            filled[kind] = filled.get(kind, 0) + tensor.nbytes
        self._groups: list[_Group] = []
        for (dtype, device), groups in grouped.items():
            largest = max(sum(tensors[i].numel() for i in group) for group in groups)
            scratch = torch.empty(largest, dtype=dtype, device=device)  # shared by the groups
            self._groups += [_Group(group, tensors, frozen, scratch) for group in groups]
        # Each tensor's frozen mask: a view of its group's flat one.
        self._masks = {
            i: m for g in self._groups for i, m in zip(g.positions, g.masks, strict=True)
        }

    @torch.no_grad()
    def zero_(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Set the frozen entries of `tensors` (gradients) to 0, inf and NaN included."""
        for group in self._groups:
            targets, views = group.gather(tensors)
            if targets:
                torch._foreach_copy_(views, targets)
                group.flat.masked_fill_(group.frozen, 0)
                torch._foreach_copy_(targets, views)

    @torch.no_grad()
    def zero_one_(self, index: int, tensor: torch.Tensor) -> None:
        """Set the frozen entries of `tensors[index]` alone to 0 (one operator)."""
        tensor.masked_fill_(self._masks[index], 0)

    @torch.no_grad()
    def snapshot(self, tensors: Sequence[torch.Tensor]) -> None:
        """Remember the values of the frozen entries (the whole tensors are kept, flat)."""
        for group in self._groups:
            targets, views = group.gather(tensors)
            torch._foreach_copy_(views, targets)
            group.initial = group.flat.clone()

    @torch.no_grad()
    def restore_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Put the frozen entries of `tensors` back to their snapshot values, bitwise."""
        for group in self._groups:
            if group.initial is None:
                raise RuntimeError("fish_mask: restore_() before snapshot().")
            targets, views = group.gather(tensors)
            torch._foreach_copy_(views, targets)
            torch.where(group.frozen, group.initial, group.flat, out=group.flat)
            torch._foreach_copy_(targets, views)


class GradientMask:
    """Applies boolean masks (True = trainable) to the parameters they are keyed like."""

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, torch.Tensor],
        *,
        each_gradient: bool = False,
    ) -> None:
        """`each_gradient`: zero each gradient in its own hook as it arrives (one operator per
        tensor and backward, as before the grouped masking), for a launcher whose own
        post-accumulate-grad hooks, registered after ours, take the gradient away at once
        (DeepSpeed copies it into its reduction buckets)."""
        self._each_gradient = each_gradient
        # Full masks, True = frozen; each rank's slice of them is cut in `bind`.
        self._frozen = {key: ~masks[key].to(torch.bool) for key in partly_selected(params, masks)}
        self._unselected = [key for key in params if not masks[key].any()]
        self._params: list[nn.Parameter] = []
        self._entries = FrozenEntries([], [])
        self._handles: list[RemovableHandle] = []
        self._queued: set[int] = set()  # autograd graph tasks with a `_settle` queued
        self.bind(params)

    def bind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Hook these parameter objects (same keys as at construction). Call again when a wrapper
        replaced them (FSDP2's `fully_shard`); a no-op while they are still the same objects.
        Take a `snapshot` after binding."""
        bound = [params[key] for key in self._frozen]
        if self._params and all(a is b for a, b in zip(bound, self._params, strict=True)):
            return
        trains = [key for key in self._unselected if params[key].requires_grad]
        if trains:
            raise RuntimeError(
                f"fish_mask: tensor {trains[0]!r} has no selected entry but requires gradients "
                f"again after the model was wrapped; it would train densely."
            )
        self.remove()
        self._params = bound
        frozen = [local_mask(mask, p) for mask, p in zip(self._frozen.values(), bound, strict=True)]
        self._entries = FrozenEntries(local_parts(bound), frozen)
        for index, param in enumerate(bound):
            hook = self._zero_at(index) if self._each_gradient else self._on_gradient
            self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def snapshot(self) -> None:
        """Record the values the frozen entries must keep (call once training weights are final,
        i.e. after a checkpoint was loaded)."""
        self._entries.snapshot(local_parts(self._params))

    def restore(self) -> None:
        """Put frozen entries back to their snapshot values (call after each optimizer step)."""
        self._entries.restore_(local_parts(self._params))

    def mask_gradients(self) -> None:
        """Zero the frozen entries of the gradients present (done at the end of every backward
        pass; call it where gradients are set without one)."""
        self._entries.zero_(local_parts([param.grad for param in self._params]))

    def remove(self) -> None:
        """Detach the gradient hooks (requires_grad changes stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _zero_at(self, index: int) -> Callable[[nn.Parameter], None]:
        def hook(param: nn.Parameter) -> None:
            self._entries.zero_one_(index, local_part(param.grad))

        return hook

    def _on_gradient(self, param: nn.Parameter | None = None) -> None:
        """A gradient arrived: make sure the masking runs when this backward pass ends."""
        task = torch._C._current_graph_task_id()
        if task < 0:  # not in a backward pass: a wrapper set the gradient itself
            self.mask_gradients()
        elif task not in self._queued:
            self._queued.add(task)
            Variable._execution_engine.queue_callback(self._settle)

    def _settle(self) -> None:
        """The backward pass that queued this ended. If it was nested in a node of an outer one
        (reentrant checkpointing), wait for that one; else mask after every callback queued so
        far (queued during a callback, ours runs last)."""
        outer_node = torch._C._current_autograd_node()
        if outer_node is not None:
            outer_node.register_hook(self._on_node_done)  # runs in the outer backward pass
        else:
            Variable._execution_engine.queue_callback(self._flush)

    def _on_node_done(self, grad_inputs: tuple, grad_outputs: tuple) -> None:
        self._on_gradient()

    def _flush(self) -> None:
        self._queued.clear()
        self.mask_gradients()


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
