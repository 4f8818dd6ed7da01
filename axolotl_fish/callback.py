"""A `transformers.TrainerCallback` that trains a model (PEFT or not) under a FishMask.

Usable with any HF `Trainer`:

    mask = compute_fish_mask(model, trainer.get_train_dataloader(), FishMaskConfig(keep_ratio=0.5))
    trainer.add_callback(FishMaskCallback(model, mask))   # before trainer.train()
    trainer.train()
"""

from __future__ import annotations

import os

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from axolotl_fish.candidates import governed_by
from axolotl_fish.distributed import check_identical_across_ranks
from axolotl_fish.mask_file import FishMask
from axolotl_fish.masking import GradientMask
from axolotl_fish.sharded import parameters_by_name


class FishMaskCallback(TrainerCallback):
    """Freezes unselected entries and writes the mask into `output_dir` when training starts (where
    the final adapter goes) and into every checkpoint.

    Construct it before `trainer.train()`: fully unselected tensors stop requiring gradients
    here, before the optimizer is built. Under torch.distributed it first checks that every
    rank holds the same mask (`digest`: its SHA-256). When training starts it follows the
    parameters by name to the model the Trainer prepared: FSDP2 replaced them by sharded ones.
    """

    def __init__(self, model: nn.Module, mask: FishMask) -> None:
        params = governed_by(mask, model)  # tensors outside its include/exclude train densely
        mask.check_matches(params)
        self.digest = check_identical_across_ranks(mask.masks)
        self.mask = mask
        self.gradient_mask = GradientMask(params, mask.masks)
        names = {id(param): name for name, param in model.named_parameters()}
        self._names = {key: names[id(param)] for key, param in params.items()}

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        if model is not None:  # prepared (under FSDP2: sharded) by now
            self.gradient_mask.bind(parameters_by_name(model, self._names))
        # After a resume the checkpoint's weights are loaded by now; frozen entries keep those.
        self.gradient_mask.snapshot()
        # Written before the first step, so a run killed before its checkpoint's mask is written
        # (the Trainer calls on_save only after the checkpoint is complete) can resume with it.
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self.mask.save(args.output_dir)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.gradient_mask.restore()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        if state.is_world_process_zero:
            checkpoint = os.path.join(
                args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            )
            self.mask.save(checkpoint)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.gradient_mask.remove()
