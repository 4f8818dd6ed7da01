"""Scoring a model after FSDP2 has sharded it: whether a mask can be made that way, and the
callback that makes it when training starts.

Before sharding, the Fisher pass needs the whole model on one device. After it, each rank gathers
one layer at a time, as training does, and the batched Fisher rules record layer inputs and
output gradients, which every rank holds whole, and read parameter values (norms, DoRA
magnitudes, LoRA embeddings) during that layer's backward, while it is gathered: no device ever
holds the whole model. That serves every candidate a rule claims, the built-in scorers, which
read nothing else, and adapters only: full-parameter mode registers the value vectors of its
selected entries before the model is wrapped. A dense warm-up (`warmup_steps`) steps the sharded
adapter, FSDP2 gathering it and averaging its gradients as in training.

The Trainer shards the model inside `train()`, after it built the optimizer over every trainable
tensor. So the mask is made in `on_train_begin`; tensors with no selected entry then stop
requiring gradients (FSDP2 follows that at its next gather): they get no gradient, and AdamW, which
skips tensors without one, keeps no state for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from axolotl_fish.adapters.tensors import trainable_parameters, trains_own_weights
from axolotl_fish.base.sharded import names_of, parameters_by_name
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.fisher.rules import claim_rules
from axolotl_fish.masks.candidates import select_candidates
from axolotl_fish.masks.file import FishMask
from axolotl_fish.training.callback import FishMaskCallback

# The built-in scorers read parameter shapes, layer inputs and output gradients only.
SCORERS_FOR_SHARDED = frozenset({"fisher", "reverse", "random"})

# `score(prepared model, its trainable tensors keyed like the saved adapter)` -> the mask.
MaskScorer = Callable[[nn.Module, Mapping[str, nn.Parameter]], FishMask]
# `adopt(mask, its SHA-256)`, once every rank is known to hold that mask.
MaskAdopter = Callable[[FishMask, str], None]


def why_not_after_sharding(model: nn.Module, config: FishMaskConfig) -> str | None:
    """None if the mask of `model` (whole: not yet sharded) can be computed after FSDP2 shards
    it; else why not, in words."""
    if trains_own_weights(model):
        return (
            "full-parameter mode sets up the value vectors of the selected entries before FSDP2 "
            "shards the model"
        )
    if config.strategy not in SCORERS_FOR_SHARDED:
        return f"strategy {config.strategy!r} is not a built-in scorer and may read tensor values"
    if config.strategy == "random":
        return None
    params = select_candidates(trainable_parameters(model), config.include, config.exclude)
    batched = {key for rule in claim_rules(model, params) for key in rule.keys}
    whole = [key for key in params if key not in batched]
    if whole:
        return (
            f"tensor {whole[0]!r} ({len(whole)} in all) is scored one example at a time, which "
            f"needs it whole on one device"
        )
    return None


class ScoredWhenTrainingStarts(FishMaskCallback):
    """A `FishMaskCallback` whose mask is made in `on_train_begin`, by `score`, on the model the
    Trainer prepared (under FSDP2: sharded). Construct it before `trainer.train()`, with the
    model not yet wrapped: its tensors' names are taken then, to find them again after.
    `adopt`, if given, receives the mask and its digest once every rank is known to hold it."""

    def __init__(
        self, model: nn.Module, score: MaskScorer, adopt: MaskAdopter | None = None
    ) -> None:
        if trains_own_weights(model):
            raise ValueError(
                "fish_mask: a full-parameter mask must exist before the model is wrapped; "
                "compute it first and use FishMaskCallback."
            )
        self._score, self._adopt = score, adopt
        self._trainable_names = names_of(model, trainable_parameters(model))
        self.mask = None
        self._begin = self._score_then_begin  # called by `on_train_begin`

    def _score_then_begin(self, prepared: nn.Module | None) -> None:
        if prepared is None:
            raise ValueError("fish_mask: the Trainer passed no model to score when training starts")
        trainable = parameters_by_name(prepared, self._trainable_names)
        mask = self._score(prepared, trainable)
        self._setup(prepared, mask, trainable, sparse=False)
        if self._adopt is not None:
            self._adopt(mask, self.digest)
        self._begin(prepared)  # the mask's own start, which `_setup` put in place
