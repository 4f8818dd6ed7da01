"""Adapter modules a mask leaves unable to change the model.

LoRA's update is B·A and a bottleneck adapter's is up(f(down(x))). Where the output side (LoRA's
`lora_B`, a bottleneck's up-projection) is all zero - PEFT's and this package's initialisation -
and the mask selects none of its entries, the update stays exactly 0 for the whole run, whatever
trains on the input side. A `reverse` mask at initialisation does this (every `lora_A` entry
scores 0, the lowest), and so can a small budget with `scope: global`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from axolotl_fish.adapters.tensors import natural_order, output_side_module

LOG = logging.getLogger(__name__)


def modules_fixed_at_zero(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> list[str]:
    """The adapter modules (key prefixes) whose every output-side tensor in `masks` is zero in
    `params` and has no selected entry."""
    output_side: dict[str, list[str]] = defaultdict(list)
    for key in masks:
        module = output_side_module(key)
        if module is not None:
            output_side[module].append(key)
    return sorted(
        (
            module
            for module, keys in output_side.items()
            if not any(masks[key].any() or params[key].detach().any() for key in keys)
        ),
        key=natural_order,
    )


def record_modules_fixed_at_zero(
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
    cause: str,
) -> None:
    """Warn about `modules_fixed_at_zero` and record them in the mask's `metadata` (the summary
    shows them), replacing any earlier record; `cause` says what decided the mask. Where there
    are none, the metadata has no record."""
    metadata.pop("modules_fixed_at_zero", None)
    fixed = modules_fixed_at_zero(params, masks)
    if not fixed:
        return
    metadata["modules_fixed_at_zero"] = fixed
    names = ", ".join(fixed[:3]) + (", ..." if len(fixed) > 3 else "")
    LOG.warning(
        f"fish_mask: {len(fixed)} adapter module(s) get no entry on their output side "
        f"(lora_B, a bottleneck's up-projection), which is all zero, so their update stays "
        f"exactly 0 for the whole run: {names}. {cause} (docs/how-it-works.md); "
        f"`scope: per_tensor` gives every tensor its share of k."
    )
