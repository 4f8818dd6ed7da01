"""A `transformers.TrainerCallback` that trains a model (PEFT or not) under a FishMask.

Usable with any HF `Trainer`:

    mask = compute_fish_mask(model, trainer.get_train_dataloader(), FishMaskConfig(keep_ratio=0.5))
    trainer.add_callback(FishMaskCallback(model, mask))   # before trainer.train()
    trainer.train()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from axolotl_fish.adapters.tensors import trainable_parameters, trains_own_weights
from axolotl_fish.base.ranks import check_identical_across_ranks, rank_and_world
from axolotl_fish.base.sharded import is_sharded, names_of, parameters_by_name
from axolotl_fish.masks.candidates import governed_by
from axolotl_fish.masks.file import FishMask
from axolotl_fish.training.delta import DeltaRecorder, SparseDelta
from axolotl_fish.training.masking import GradientMask
from axolotl_fish.training.sparse import SparseTraining


class FishMaskCallback(TrainerCallback):
    """Trains only the selected entries and writes the mask into `output_dir` when training starts
    (where the final weights go) and into every checkpoint.

    With an adapter (PEFT, bottleneck), unselected entries get a zero gradient and are put back
    after every step (`GradientMask`). Without one (full-parameter mode), partly selected weights
    are frozen and only their selected values train (`SparseTraining`: O(k) gradient and optimizer
    state); `fish_delta.safetensors` (the changed entries, see `sparse_delta`) is then written
    into every checkpoint and, when training ends, into `output_dir`. Under FSDP2 the value
    vectors are sharded like the weights. `sparse=False` keeps full-parameter mode on
    `GradientMask` (dense gradients and optimizer state).

    Construct it before `trainer.train()`, while the model holds its initial weights: tensors
    with no selected entry stop requiring gradients here, before the optimizer is built. Under
    torch.distributed it first checks that every rank holds the same mask (`digest`: its SHA-256).
    When training starts it follows the parameters by name to the model the Trainer prepared:
    FSDP2 replaced them by sharded ones.
    """

    # True for a launcher whose own gradient hooks take each gradient right after ours
    # (DeepSpeed): `GradientMask` then zeroes each gradient in its hook, not once per backward.
    mask_each_gradient = False

    def __init__(self, model: nn.Module, mask: FishMask, *, sparse: bool = True) -> None:
        self._setup(model, mask, trainable_parameters(model), sparse)

    def _setup(
        self,
        model: nn.Module,
        mask: FishMask,
        trainable: Mapping[str, nn.Parameter],
        sparse: bool,
    ) -> None:
        params = governed_by(mask, trainable)  # tensors outside its include/exclude train densely
        mask.check_matches(params)
        self.digest = check_identical_across_ranks(mask.masks)
        self.mask: FishMask | None = mask
        self.delta: DeltaRecorder | None = None
        self._sharded = False  # set when training starts: FSDP2 prepared the model
        self._begin: Callable[[nn.Module | None], None]
        if sparse and trains_own_weights(model):
            self.delta = DeltaRecorder(
                model, trainable, mask.masks, record_base=rank_and_world()[0] == 0
            )
            self._changed_names = names_of(model, trainable)
            self.sparse_training = SparseTraining(model, params, mask.masks)
            self._begin = self._begin_sparse
            self._step, self._end = self.sparse_training.after_step, self.sparse_training.remove
        else:
            gradient_mask = GradientMask(params, mask.masks, each_gradient=self.mask_each_gradient)
            self._begin = _rebinding(gradient_mask, names_of(model, params))
            self._step, self._end = gradient_mask.restore, gradient_mask.remove

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        # The model is prepared (under FSDP2: sharded) by now, and after a resume the
        # checkpoint's weights are loaded: training continues from them.
        self._begin(model)
        # Written before the first step, so a run killed before its checkpoint's mask is written
        # (the Trainer calls on_save only after the checkpoint is complete) can resume with it.
        if self.mask is not None and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self.mask.save(args.output_dir)
        elif not state.is_world_process_zero:
            # Only world process zero writes mask files; a full-parameter mask is 1 byte per
            # weight of host memory that the other ranks need not keep.
            self.mask = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._step()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._save_into(_checkpoint_dir(args, state), state)

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # With `push_to_hub`, the Trainer uploads a checkpoint (hub_strategy `checkpoint` or
        # `all_checkpoints`) before `on_save`: the mask must be in it already. output_dir, which
        # every push uploads, has had its mask since training began.
        self._save_into(_checkpoint_dir(args, state), state, only_if_present=True)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        delta = self._delta_for(state.is_world_process_zero)  # while the values are there
        self._end()
        if delta is not None and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            delta.save(args.output_dir)

    def _begin_sparse(self, prepared: nn.Module | None) -> None:
        if prepared is not None:
            self._sharded = any(is_sharded(p) for p in prepared.parameters())
            self.delta.bind(parameters_by_name(prepared, self._changed_names))
        self.sparse_training.read_back()

    def _delta_for(self, write: bool) -> SparseDelta | None:
        """The sparse delta so far where it is written; under FSDP2 every rank takes part in
        gathering it (the value vectors, and any densely trained tensor whole)."""
        if self.delta is None or not (write or self._sharded):
            return None
        return self.delta.delta(self.sparse_training.selected_values())

    def _save_into(self, folder: str, state: TrainerState, only_if_present: bool = False) -> None:
        """The mask and, in full-parameter mode, the sparse delta, into a checkpoint folder.
        Called on every rank: gathering an FSDP2 delta takes all of them."""
        write = state.is_world_process_zero and (os.path.isdir(folder) or not only_if_present)
        delta = self._delta_for(write)
        if write and self.mask is not None:
            self.mask.save(folder)
            if delta is not None:
                delta.save(folder)


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    """The `checkpoint-N` folder the Trainer saves at the current step."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _rebinding(
    gradient_mask: GradientMask, names: dict[str, str]
) -> Callable[[nn.Module | None], None]:
    def begin(prepared: nn.Module | None) -> None:
        if prepared is not None:
            gradient_mask.bind(parameters_by_name(prepared, names))
        gradient_mask.snapshot()

    return begin
