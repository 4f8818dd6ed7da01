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


class FishMaskCallback(TrainerCallback):
    """Freezes unselected entries and writes the mask into `output_dir` when training starts (where
    the final adapter goes) and into every checkpoint.

    Construct it before `trainer.train()`: fully unselected tensors stop requiring gradients
    here, before the optimizer is built. Under torch.distributed it first checks that every
    rank holds the same mask (`digest`: its SHA-256).
    """

    def __init__(self, model: nn.Module, mask: FishMask) -> None:
        params = governed_by(mask, model)  # tensors outside its include/exclude train densely
        mask.check_matches(params)
        self.digest = check_identical_across_ranks(mask.masks)
        self.mask = mask
        self.gradient_mask = GradientMask(params, mask.masks)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
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
            self.mask.save(_checkpoint_dir(args, state))

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # With `push_to_hub`, the Trainer uploads a checkpoint (hub_strategy `checkpoint` or
        # `all_checkpoints`) before `on_save`: the mask must be in it already. output_dir, which
        # every push uploads, has had its mask since training began.
        checkpoint = _checkpoint_dir(args, state)
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            self.mask.save(checkpoint)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self.gradient_mask.remove()


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    """The `checkpoint-N` folder the Trainer saves at the current step."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
