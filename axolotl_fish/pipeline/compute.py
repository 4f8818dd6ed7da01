"""From a model and its training data to a FishMask: score, select exactly k, record how."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from typing import Any

import torch
from torch import nn

from axolotl_fish.adapters.bottleneck import bottleneck_settings
from axolotl_fish.adapters.tensors import count_entries, trainable_parameters
from axolotl_fish.base.ranks import rank_and_world
from axolotl_fish.config import BUDGET_KEYS, FishMaskConfig
from axolotl_fish.masks.budget import budget, budget_groups
from axolotl_fish.masks.candidates import select_candidates
from axolotl_fish.masks.file import FishMask
from axolotl_fish.masks.selection import select_in_groups
from axolotl_fish.scorers import ScoringContext, check_strategy, score
from axolotl_fish.training.warmup import dense_warmup, restore
from axolotl_fish.training.zero_updates import record_modules_fixed_at_zero

LOG = logging.getLogger(__name__)

_PEFT_SETTINGS = (
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "target_modules",
    "use_dora",
    "use_rslora",
    "init_lora_weights",
    "modules_to_save",
    "adapter_len",  # llama-adapter (PEFT's adaption prompt)
    "adapter_layers",
)


def compute_fish_mask(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: FishMaskConfig,
    *,
    learning_rate: float = 1e-4,
    progress: bool = True,
    trainable: Mapping[str, nn.Parameter] | None = None,
) -> FishMask:
    """Rank every candidate entry with the scorer `config.strategy`; keep exactly k.

    Candidates are the trainable tensors (a PEFT model's adapter, or any other model's own
    parameters: full-parameter mode) that `config.include` / `config.exclude` pick.
    `batches` are training micro-batches (read by scorers such as `fisher` and `reverse`, and by
    the dense warm-up at `learning_rate`); the model must be as it will start training.
    `trainable` (keyed like the saved adapter or model) is for a model FSDP2 has sharded, whose
    tensors can no longer be matched to their saved names: look them up by the names they had
    before (`sharded.parameters_by_name`).
    """
    check_strategy(config.strategy)  # before the warm-up or any pass over the data
    if trainable is None:
        trainable = trainable_parameters(model)
    params = select_candidates(trainable, config.include, config.exclude)
    dense = count_entries(trainable) - count_entries(params)
    if dense:
        LOG.warning(
            f"fish_mask: {len(trainable) - len(params)} trainable tensors ({dense:,} entries) "
            f"are outside fish_mask.include/exclude: they train densely, outside k."
        )
    total = count_entries(params)
    k = budget(config, params)
    metadata: dict[str, Any] = {
        "strategy": config.strategy,
        "fisher": config.fisher,
        **{key: getattr(config, key) for key in BUDGET_KEYS},
        "scope": config.scope,
        "k": k,
        "total": total,
        "num_samples": config.num_samples,
        "seed": config.seed,
        "include": config.include,
        "exclude": config.exclude,
        "dense_outside": dense,
        "world_size": rank_and_world()[1],
        "axolotl_fish_version": version("axolotl-fish"),
        **peft_settings(model),
    }
    if config.warmup_steps:  # for every strategy, so they differ only in the mask
        initial = dense_warmup(
            model, batches, trainable, config.warmup_steps, learning_rate, progress=progress
        )
        metadata |= {
            "warmup_steps": config.warmup_steps,
            "restore_after_warmup": config.restore_after_warmup,
        }
    context = ScoringContext(model, batches, params, config, progress)
    scored = score(config.strategy, context)
    metadata |= scored.metadata
    scores = scored.scores
    if config.warmup_steps and config.restore_after_warmup:
        restore(trainable, initial)
    groups = budget_groups(list(scores), config.scope)
    masks, ties = select_in_groups(scores, k, config.seed, groups)
    if ties:
        metadata["tie_breaks"] = [vars(tie) for tie in ties]
        drawn = sum(tie.chosen for tie in ties)
        LOG.warning(
            f"fish_mask: {drawn:,} of {k:,} entries were drawn at random among entries with "
            f"equal scores (at initialisation every lora_A and bottleneck down-projection "
            f"score is exactly 0). fish_mask.warmup_steps would score them; in the project's "
            f"equal-budget benchmark that was not shown to train a better LoRA adapter "
            f"(docs/how-it-works.md)."
        )
    record_modules_fixed_at_zero(
        params,
        masks,
        metadata,
        f"Strategy {config.strategy!r} with k = {k:,} of {total:,} entries decided this",
    )
    return FishMask(masks=masks, metadata=metadata)


def peft_settings(model: nn.Module) -> dict[str, Any]:
    """The adapter settings a mask depends on, for its metadata; with bottleneck adapters their
    settings; without an adapter (full-parameter mode) the model's name."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        bottleneck = bottleneck_settings(model)
        if bottleneck is not None:
            settings = {f"bottleneck_{key}": value for key, value in bottleneck.items()}
            return {"peft_type": "BOTTLENECK", "base_model_name_or_path": name, **settings}
        return {"peft_type": None, "base_model_name_or_path": name}
    settings = peft_config.to_dict()
    return {
        name: sorted(value) if isinstance(value, set) else value
        for name, value in settings.items()
        if name in _PEFT_SETTINGS
    }
