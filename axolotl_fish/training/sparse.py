"""Train only the selected entries of a model's own weights, at O(k) gradient and optimizer memory.

For every tensor with some (not all) entries selected:
- the weight stays frozen: `requires_grad=False`, so it gets no `.grad`, no optimizer state,
  and DDP neither buckets nor all-reduces it;
- a trainable vector of its k_t selected values (initialised from the weight at the selected flat
  indices, int32 where they fit) is registered on the module that owns the weight, as
  `<name>_fish_values`. Any optimizer built from the model's `requires_grad` parameters (the HF
  Trainer's) therefore holds AdamW state for k entries only, and gradient clipping, weight decay
  (the name keeps the weight's module and name, so the Trainer's no-decay rules for biases and
  norms apply alike), accumulation and the LR schedule act on exactly the entries that dense
  masked training would move;
- while a module owning the weight runs forward, its weight is replaced by a view of itself whose
  backward keeps only the selected entries of the gradient: the dense gradient of one tensor
  exists only while backward passes that layer, never all at once. A tied weight (lm_head and
  the input embedding) gets the gradients of both uses;
- after every optimizer step the values are written into the weight (k entries). Unselected
  entries are never written, so they stay bitwise equal to the base model.

The values never reach a state dict (a hook drops them), so `save_pretrained` and the Trainer's
checkpoints write a standard `model.safetensors` holding the trained weights; loading one (a
resume) reads the values back from the weight.

Under FSDP2 (construct it before `fully_shard`, as the callback is) the value vectors are ordinary
parameters of their modules, so FSDP2 shards them like the weights: each rank holds AdamW state for
its share of k, gathers the values for forward and reduce-scatters their gradients. The weight and
the values are looked up on their module at every use (FSDP2 swaps in sharded and gathered
copies); after each step every rank gathers one tensor's values at a time and writes those that
fall into its rows of the weight. Tensors with no selected entry only stop requiring
gradients; fully selected tensors and tensors outside the candidates train densely, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from axolotl_fish.base.sharded import flat_range, full_tensor, local_part, local_slice
from axolotl_fish.training.masking import partly_selected

VALUES_SUFFIX = "_fish_values"
# `index_copy_` takes int64 indices only: writing back this many entries at a time bounds the
# transient int64 copy of a tensor's int32 indices to 32 MiB, whatever its k.
WRITE_CHUNK = 1 << 22


class _SelectedGradient(torch.autograd.Function):
    """The weight itself (a view) in forward; in backward, the gradient of the selected entries
    goes to `values` and the dense gradient is dropped."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        weight: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(indices)
        return weight.view_as(weight)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        return None, grad.reshape(-1).index_select(0, indices), None


class _SparseTensor:
    """One partly selected weight: its owners, selected flat indices and trainable values.

    The weight and the values are looked up on their module at each use: FSDP2 replaces both by
    sharded parameters (and, during forward, by their gathered copies) under the same names."""

    def __init__(self, key: str, weight: nn.Parameter, mask: torch.Tensor, model: nn.Module):
        if not weight.is_contiguous():
            raise ValueError(f"Sparse training needs contiguous weights; {key!r} is not.")
        self.key = key
        flat = mask.to(weight.device).reshape(-1).nonzero()[:, 0]
        small = weight.numel() <= torch.iinfo(torch.int32).max
        self.indices = flat.to(torch.int32) if small else flat
        module_path, self.name = key.rsplit(".", 1) if "." in key else ("", key)
        self.home = model.get_submodule(module_path)
        if self.home._parameters.get(self.name) is not weight:
            raise ValueError(f"{key!r} is not the parameter {self.name!r} of {module_path!r}.")
        self.owners = [
            module for module in model.modules() if module._parameters.get(self.name) is weight
        ]
        values = nn.Parameter(weight.detach().reshape(-1).index_select(0, self.indices))
        weight.requires_grad_(False)
        self.home.register_parameter(self.values_name, values)
        self._in_use: dict[int, torch.Tensor] = {}  # owner id -> its weight, while swapped out
        self._local: tuple[int, torch.Tensor] | None = None  # this rank's part: start, indices

    @property
    def values_name(self) -> str:
        return self.name + VALUES_SUFFIX

    @property
    def weight(self) -> torch.Tensor:
        return self.home._parameters[self.name]

    @property
    def values(self) -> nn.Parameter:
        return self.home._parameters[self.values_name]

    def swap_in(self, owner: nn.Module) -> None:
        weight = owner._parameters[self.name]
        self._in_use[id(owner)] = weight
        indices = self._indices_on(weight.device)
        owner._parameters[self.name] = _SelectedGradient.apply(weight, self.values, indices)

    def swap_out(self, owner: nn.Module) -> None:
        owner._parameters[self.name] = self._in_use.pop(id(owner))

    @torch.no_grad()
    def write_back(self) -> None:
        """Put the trained values into the weight (the selected entries only). Under FSDP2 every
        rank gathers the values and writes those that fall into its slice of the weight."""
        weight, values = self.weight, full_tensor(self.values)
        flat = local_part(weight).view(-1)
        start, indices = self._local_indices(flat.device)
        values = values[start : start + indices.numel()].to(weight.dtype)
        for first in range(0, indices.numel(), WRITE_CHUNK):
            chunk = slice(first, first + WRITE_CHUNK)
            flat.index_copy_(0, indices[chunk].long(), values[chunk])

    @torch.no_grad()
    def read_back(self) -> None:
        """Take the values from the weight (after a checkpoint was loaded into it)."""
        flat = full_tensor(self.weight).reshape(-1)
        selected = flat.index_select(0, self._indices_on(flat.device))
        local_part(self.values).copy_(local_slice(selected, self.values))

    def _indices_on(self, device: torch.device) -> torch.Tensor:
        """The indices, moved to `device` once the weight lives there (Axolotl loads an FSDP
        model on CPU; FSDP2 moves it to the GPU when it shards it)."""
        if self.indices.device != device:
            self.indices, self._local = self.indices.to(device), None
        return self.indices

    def _local_indices(self, device: torch.device) -> tuple[int, torch.Tensor]:
        """Where this rank's slice of the weight begins in `indices`, and the flat positions of
        the selected entries in that slice (all of them on one device), on `device`."""
        self._indices_on(device)
        if self._local is None:
            begin, end = flat_range(self.weight)
            if (begin, end) == (0, self.weight.numel()):
                self._local = 0, self.indices  # the whole weight: no copy of the indices
            else:
                bounds = torch.tensor([begin, end], dtype=self.indices.dtype)
                found = torch.searchsorted(self.indices, bounds.to(self.indices.device))
                first, last = found.tolist()
                self._local = first, self.indices[first:last] - begin
        return self._local


class SparseTraining:
    """Trains the selected entries of `params` (keyed like `model.safetensors`, as the masks) on
    `model`. Construct it before the optimizer is built; call `after_step` after every optimizer
    step, `read_back` once a checkpoint's weights were loaded, `remove` when training is over."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, torch.Tensor],
    ) -> None:
        self.tensors: list[_SparseTensor] = []
        self._handles: list[RemovableHandle] = []
        for key, param in partly_selected(params, masks).items():
            self.tensors.append(_SparseTensor(key, param, masks[key], model))
        for tensor in self.tensors:
            for owner in tensor.owners:
                self._handles += [
                    owner.register_forward_pre_hook(_swap_in(tensor)),
                    owner.register_forward_hook(_swap_out(tensor), always_call=True),
                ]
            self._handles += [
                tensor.home._register_state_dict_hook(_drop_values(tensor.values_name)),
                tensor.home.register_load_state_dict_post_hook(_after_load(tensor)),
            ]

    @property
    def k(self) -> int:
        """Entries trained through value vectors."""
        return sum(tensor.values.numel() for tensor in self.tensors)

    def after_step(self) -> None:
        for tensor in self.tensors:
            tensor.write_back()

    def read_back(self) -> None:
        for tensor in self.tensors:
            tensor.read_back()

    @torch.no_grad()
    def selected_values(self) -> dict[str, torch.Tensor]:
        """`{key: the trained values of its selected entries}`, in flat-index order and the
        weight's dtype; under FSDP2 a collective that gathers k values, not the weights."""
        return {t.key: full_tensor(t.values).to(t.weight.dtype) for t in self.tensors}

    def remove(self) -> None:
        """Write the values into the weights and give the model back its plain parameters
        (weights trainable again, no value vectors, no hooks)."""
        self.after_step()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for tensor in self.tensors:
            del tensor.home._parameters[tensor.values_name]
            tensor.weight.requires_grad_(True)
        self.tensors.clear()


def _swap_in(tensor: _SparseTensor):
    def hook(module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            tensor.swap_in(module)

    return hook


def _swap_out(tensor: _SparseTensor):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if id(module) in tensor._in_use:
            tensor.swap_out(module)

    return hook


def _drop_values(name: str):
    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        state_dict.pop(prefix + name, None)

    return hook


def _after_load(tensor: _SparseTensor):
    def hook(module: nn.Module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        for key in [key for key in missing if key.rsplit(".", 1)[-1] == tensor.values_name]:
            missing.remove(key)
        tensor.read_back()

    return hook
