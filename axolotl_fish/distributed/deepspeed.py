"""FISH masks under DeepSpeed ZeRO-1, 2 and 3 (the `deepspeed` extra).

DeepSpeed owns the optimizer: it keeps an fp32 master copy of every trainable tensor, partitioned
across ranks, runs the inner torch optimizer on it, then copies the masters into the working
(possibly bf16) weights and gathers them. So freezing entries takes two things:
- gradients masked before DeepSpeed reduces them: `GradientMask`'s hooks, registered before
  `deepspeed.initialize` registers its own, fire first (under ZeRO-3 on the full-shape gradient
  of the gathered parameter), so gradient clipping counts only trainable entries;
- after each inner optimizer step, this rank's slice of the fp32 master put back at the frozen
  entries (`MasterRestore`: a step post-hook, local, no communication). DeepSpeed's own copy and
  gather then put the working weights back too. Restoring the working weights alone would not
  do: weight decay moves the masters, and the next copy would carry that into the weights.

The snapshot is taken from the masters when training starts: after DeepSpeed cast them and after
any checkpoint was loaded. Full-parameter mode trains dense-masked (DeepSpeed steps whole
tensors: fp32 master and AdamW moments for every partly selected weight, partitioned).

The slices are read from DeepSpeed internals (`INTERNALS`); the extra pins DeepSpeed's minor
version and `check_internals` names any that is gone.

Floor 5: may import floors 1-4 and DeepSpeed; never `integration` or Axolotl.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import deepspeed
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerControl, TrainerState, TrainingArguments

from axolotl_fish.adapters.tensors import trains_own_weights
from axolotl_fish.base.sharded import names_of, parameters_by_name
from axolotl_fish.masks.candidates import governed_by
from axolotl_fish.masks.file import FishMask
from axolotl_fish.training.callback import FishMaskCallback
from axolotl_fish.training.masking import partly_selected

# What the restore reads, per optimizer kind: ZeRO-1/2 and BF16_Optimizer map every parameter to
# its fragment of the flat fp32 partition (`_hp_mapping`, None where this rank holds none);
# ZeRO-3 keeps one flat fp32 partition per sub-group, located through `grad_position`.
INTERNALS = {
    "zero3": ("grad_position", "get_param_id", "fp32_partitioned_groups_flat",
              "_get_param_partition_rank", "optimizer"),
    "fragments": ("optimizer",),
    "parameter": ("_hp_mapping",),
    "fragment": ("hp_fragment", "lp_fragment_address"),
}  # fmt: skip


def zero_stage(config: Mapping[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_deepspeed_config(config: Mapping[str, Any], *, full_parameter: bool) -> int:
    """Refuse, by name, DeepSpeed settings FISH masks were not tested with; return the ZeRO
    stage. `config` is the DeepSpeed JSON (`deepspeed:` in Axolotl)."""
    stage = zero_stage(config)
    zero = config.get("zero_optimization") or {}
    if stage not in (1, 2, 3):
        raise ValueError(
            f"fish_mask under deepspeed needs zero_optimization.stage 1, 2 or 3 (got {stage}); "
            f"stage 0 was not tested."
        )
    refused = [
        (f"zero_optimization.{key}.device: nvme", "NVMe offload")
        for key in ("offload_optimizer", "offload_param")
        if (zero.get(key) or {}).get("device") == "nvme"
    ]
    if int(zero.get("zero_hpz_partition_size", 1)) > 1:
        refused.append(("zero_optimization.zero_hpz_partition_size > 1", "hpZ (ZeRO++)"))
    if zero.get("mics_shard_size", -1) not in (-1, 0, None):
        refused.append(("zero_optimization.mics_shard_size", "MiCS"))
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if zero.get(key):
            refused.append((f"zero_optimization.{key}: true", "ZeRO++ quantization"))
    if refused:
        setting, name = refused[0]
        raise ValueError(
            f"fish_mask under deepspeed: {setting} ({name}) is not supported: the master "
            f"restore was not tested with it. Remove it from the DeepSpeed config."
        )
    if stage == 3 and full_parameter:
        raise ValueError(
            "fish_mask under deepspeed ZeRO-3 supports adapters (LoRA) only; "
            "full-parameter mode: use zero_optimization.stage 1 or 2."
        )
    return stage


def check_no_leaf_modules(model: nn.Module) -> None:
    """Refuse ZeRO-3 leaf modules (Axolotl and accelerate mark MoE blocks so): their parameters
    are gathered for the whole block, a path the gradient hooks were not tested on."""
    leaf = next(
        (name for name, module in model.named_modules() if getattr(module, "_z3_leaf", 0)), None
    )
    if leaf is not None:
        raise ValueError(
            f"fish_mask under deepspeed ZeRO-3: module {leaf!r} is a ZeRO-3 leaf module (MoE "
            f"block); not supported. Use ZeRO-1/2 or FSDP2."
        )


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 partitioned some parameters (`zero.Init` at load, or `initialize`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every ZeRO-3 partitioned parameter of `model` whole on every rank for the block (the
    Fisher pass on a model loaded under `zero.Init`), partitioned again after; changes made to
    partitioned parameters inside are dropped."""
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimizer, through the wrappers around it (accelerate's)."""
    inner = optimizer
    while not isinstance(inner, deepspeed.runtime.base_optimizer.ZeROOptimizer):
        if not hasattr(inner, "optimizer"):
            raise ValueError(
                f"fish_mask under deepspeed: {type(optimizer).__name__} wraps no DeepSpeed ZeRO "
                f"optimizer; the run is not under DeepSpeed ZeRO-1/2/3."
            )
        inner = inner.optimizer
    return inner


def check_internals(optimizer: Any, params: Mapping[str, nn.Parameter]) -> None:
    """Raise naming the first DeepSpeed internal the restore reads that is gone."""

    def need(obj: Any, names: tuple[str, ...], where: str) -> None:
        gone = [name for name in names if not hasattr(obj, name)]
        if gone:
            raise RuntimeError(
                f"fish_mask: DeepSpeed {deepspeed.__version__} has no {where}.{gone[0]}, which "
                f"the fp32 master restore reads; install the tested version "
                f"(`pip install 'axolotl-fish[deepspeed]'`)."
            )

    kind = type(optimizer).__name__
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        need(optimizer, INTERNALS["zero3"], kind)
        return
    need(optimizer, INTERNALS["fragments"], kind)
    for key, param in params.items():
        need(param, INTERNALS["parameter"], f"parameter {key!r}")
        if param._hp_mapping is not None:
            need(param._hp_mapping, INTERNALS["fragment"], f"{key!r}._hp_mapping")


# `() -> this rank's fp32 master slice of a parameter` (a view: writes reach the master).
MasterSlice = Callable[[], torch.Tensor]


def master_slices(
    optimizer: Any, params: Mapping[str, nn.Parameter], frozen: Mapping[str, torch.Tensor]
) -> dict[str, tuple[MasterSlice, torch.Tensor]]:
    """{key: (this rank's fp32 master slice of params[key], the frozen entries in it)} for the
    tensors of which this rank holds a slice with a frozen entry."""
    check_internals(optimizer, params)
    slices = {}
    for key, param in params.items():
        flat = frozen[key].flatten()
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            sub, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
            begin = numel * optimizer._get_param_partition_rank(param)  # padded at the end
            local = torch.zeros(numel, dtype=torch.bool)
            part = flat[begin : begin + numel]
            local[: part.numel()] = part
            view = partial(_zero3_master, optimizer, sub, offset, numel)
        elif param._hp_mapping is not None:  # ZeRO-1/2, BF16_Optimizer
            address = param._hp_mapping.lp_fragment_address
            local = flat[address.start : address.start + address.numel]
            view = partial(_fragment_master, param)
        else:  # this rank holds no slice of it
            continue
        if local.any():
            slices[key] = (view, local.to(view().device))
    return slices


def _zero3_master(optimizer: Any, sub: int, offset: int, numel: int) -> torch.Tensor:
    return optimizer.fp32_partitioned_groups_flat[sub].narrow(0, offset, numel)


def _fragment_master(param: nn.Parameter) -> torch.Tensor:
    return param._hp_mapping.hp_fragment


class MasterRestore:
    """Puts this rank's slice of DeepSpeed's fp32 masters back at the frozen entries after every
    step of the inner optimizer (a step post-hook, so before DeepSpeed copies the masters into
    the working weights). Construct it when training starts: the snapshot is taken then."""

    def __init__(
        self,
        optimizer: Any,
        params: Mapping[str, nn.Parameter],
        frozen: Mapping[str, torch.Tensor],
    ) -> None:
        self.optimizer = zero_optimizer(optimizer)
        self._slices = master_slices(self.optimizer, params, frozen)
        self._initial = {key: view().detach().clone() for key, (view, _) in self._slices.items()}
        self._handle: RemovableHandle | None = self.optimizer.optimizer.register_step_post_hook(
            lambda *_: self.restore()
        )

    @property
    def keys(self) -> list[str]:
        """The tensors of which this rank holds a slice with a frozen entry."""
        return list(self._slices)

    @torch.no_grad()
    def restore(self) -> None:
        for key, (view, frozen) in self._slices.items():
            master = view()
            torch.where(frozen, self._initial[key], master, out=master)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class DeepSpeedFishMaskCallback(FishMaskCallback):
    """`FishMaskCallback` for a model DeepSpeed trains: gradient masks as always (registered now,
    before `deepspeed.initialize`), and the fp32 master restore from the start of training, on
    the ZeRO optimizer the Trainer passes to `on_train_begin`. Full-parameter mode is
    dense-masked. The working weights are put back by DeepSpeed itself (see the module). With
    `zero3`, tensors with no selected entry keep requiring gradients, all entries frozen, so
    that the Trainer's ZeRO-3 saves keep them (it drops tensors that do not)."""

    restore: MasterRestore | None = None
    # DeepSpeed's own gradient hooks take each gradient as soon as it is ready, so it must be
    # masked in its own hook, not once when backward ends.
    mask_each_gradient = True

    def __init__(self, model: nn.Module, mask: FishMask, *, zero3: bool = False) -> None:
        check_no_leaf_modules(model)
        self._zero3 = zero3
        super().__init__(model, mask, sparse=False)

    def _setup(
        self,
        model: nn.Module,
        mask: FishMask,
        trainable: Mapping[str, nn.Parameter],
        sparse: bool,
    ) -> None:
        super()._setup(model, mask, trainable, sparse=False)
        params = governed_by(mask, trainable)
        frozen = partly_selected(params, mask.masks)
        self._whole_grad_hooks: list[RemovableHandle] = []
        if self._zero3:
            # The Trainer saves a PEFT model under ZeRO-3 without its tensors that do not require
            # gradients: a tensor with no selected entry would be missing from the saved adapter.
            # It keeps requiring them, every entry frozen (zero gradient, master restored).
            for key, param in params.items():
                if not mask.masks[key].any():
                    param.requires_grad_(True)
                    self._whole_grad_hooks.append(
                        param.register_post_accumulate_grad_hook(_no_grad)
                    )
                    frozen[key] = param
        self._frozen = {key: ~mask.masks[key].to(torch.bool) for key in frozen}
        self._names = names_of(model, frozen)
        self._begin = self._bind_masters
        self._step = _after_deepspeed_step
        self._remove_hooks, self._end = self._end, self._remove

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs,
    ) -> None:
        self._optimizer = optimizer
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _bind_masters(self, prepared: nn.Module | None) -> None:
        if self._optimizer is None or prepared is None:
            raise ValueError("fish_mask: the Trainer passed no optimizer or model to mask")
        if self.restore is not None:
            self.restore.remove()
        check_no_leaf_modules(prepared)  # accelerate may mark MoE blocks when it prepares
        params = parameters_by_name(prepared, self._names)
        self.restore = MasterRestore(self._optimizer, params, self._frozen)

    def _remove(self) -> None:
        self._remove_hooks()
        for handle in self._whole_grad_hooks:
            handle.remove()
        if self.restore is not None:
            self.restore.remove()


@torch.no_grad()
def _no_grad(param: nn.Parameter) -> None:
    param.grad.zero_()


def _after_deepspeed_step() -> None:
    """Nothing: the masters were restored inside DeepSpeed's step (a post-hook)."""


def full_parameter_note(model: nn.Module) -> str | None:
    """What full-parameter mode costs under DeepSpeed, for the log; None with an adapter."""
    if not trains_own_weights(model):
        return None
    return (
        "fish_mask: full-parameter mode under DeepSpeed trains dense-masked: DeepSpeed keeps an "
        "fp32 master and AdamW moments (12 bytes) for every entry of each partly selected "
        "weight, partitioned across ranks; the plugin adds 1 byte per entry of those weights "
        "(the mask) on every rank and 5 bytes per entry of this rank's slice (frozen entries, "
        "snapshot)"
    )
