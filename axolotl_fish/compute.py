"""From a model and its training data to a FishMask: score, select exactly k, record how."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from typing import Any

import torch
from torch import nn

from axolotl_fish.adapter_tensors import adapter_parameters, count_entries
from axolotl_fish.budget import budget, budget_groups
from axolotl_fish.config import BUDGET_KEYS, FishMaskConfig
from axolotl_fish.distributed import rank_and_world
from axolotl_fish.fisher import fisher_scores
from axolotl_fish.mask_file import FishMask
from axolotl_fish.selection import select_in_groups
from axolotl_fish.warmup import dense_warmup, restore

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
)


def compute_fish_mask(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: FishMaskConfig,
    *,
    learning_rate: float = 1e-4,
    progress: bool = True,
) -> FishMask:
    """Rank every trainable adapter entry by `config.strategy` and keep exactly k of them.

    `batches` are training micro-batches (read for `fisher` and `reverse`, and for the dense
    warm-up at `learning_rate`); the model must be the PEFT model as it will start training.
    """
    params = adapter_parameters(model)
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
        "world_size": rank_and_world()[1],
        "axolotl_fish_version": version("axolotl-fish"),
        **peft_settings(model),
    }
    if config.warmup_steps:  # for every strategy, so they differ only in the mask
        initial = dense_warmup(
            model, batches, params, config.warmup_steps, learning_rate, progress=progress
        )
        metadata |= {
            "warmup_steps": config.warmup_steps,
            "restore_after_warmup": config.restore_after_warmup,
        }
    if config.strategy == "random":
        scores = random_scores(params, config.seed)
    else:
        fisher = fisher_scores(
            model,
            batches,
            params,
            config.num_samples,
            sampled_labels_seed=config.seed if config.fisher == "sampled" else None,
            progress=progress,
        )
        metadata |= {"num_examples": fisher.num_examples, "fisher_seconds": fisher.seconds}
        sign = -1.0 if config.strategy == "reverse" else 1.0
        scores = {key: sign * score for key, score in fisher.scores.items()}
    if config.warmup_steps and config.restore_after_warmup:
        restore(params, initial)
    groups = budget_groups(list(scores), config.scope)
    masks, ties = select_in_groups(scores, k, config.seed, groups)
    if ties:
        metadata["tie_breaks"] = [vars(tie) for tie in ties]
        drawn = sum(tie.chosen for tie in ties)
        LOG.warning(
            f"fish_mask: {drawn:,} of {k:,} entries were drawn at random among entries with "
            f"equal scores (at LoRA's initialisation every lora_A score is exactly 0)."
        )
    return FishMask(masks=masks, metadata=metadata)


def random_scores(params: Mapping[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform scores from a seeded CPU generator: the same on every rank and every machine."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.rand(p.shape, generator=generator) for key, p in params.items()}


def peft_settings(model: nn.Module) -> dict[str, Any]:
    """The adapter settings a mask depends on, for its metadata (empty for a non-PEFT model)."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        return {}
    settings = peft_config.to_dict()
    return {
        name: sorted(value) if isinstance(value, set) else value
        for name, value in settings.items()
        if name in _PEFT_SETTINGS
    }
