"""Does a saved mask belong to this run? Its metadata records the adapter it was made for.

Keys and shapes decide whether a mask can apply at all (an error that names the tensor, plus
the adapter settings that explain it); equal shapes under another base model or other LoRA
settings still apply but rank another run's adapter (a warning).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from axolotl_fish.adapters.tensors import trainable_parameters
from axolotl_fish.masks.candidates import governed_by
from axolotl_fish.masks.file import FishMask
from axolotl_fish.pipeline.compute import peft_settings
from axolotl_fish.training.zero_updates import record_modules_fixed_at_zero

LOG = logging.getLogger(__name__)


def adapter_differences(mask: FishMask, model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """{setting: (in the mask, in this model)} for every recorded adapter setting that differs."""
    current = peft_settings(model)
    return {
        name: (mask.metadata[name], value)
        for name, value in current.items()
        if name in mask.metadata and mask.metadata[name] != value
    }


def check_mask_fits(mask: FishMask, model: nn.Module, source: str) -> None:
    """Raise if `mask` (read from `source`) cannot apply to the model's adapter; warn if it was
    made for an adapter with other settings, or leaves modules of this adapter fixed at zero
    (recorded in its metadata as for a computed mask)."""
    differences = ", ".join(
        f"{name}: mask {saved!r}, this run {value!r}"
        for name, (saved, value) in adapter_differences(mask, model).items()
    )
    params = governed_by(mask, trainable_parameters(model), source)
    try:
        mask.check_matches(params)
    except ValueError as err:
        reason = f" It was made for another adapter ({differences})." if differences else ""
        raise ValueError(f"{source} does not fit this model: {err}{reason}") from None
    if differences:
        LOG.warning(
            f"fish_mask: {source} was made for another adapter, used as saved ({differences})"
        )
    # What this run's adapter can move, not what the mask's own run could.
    record_modules_fixed_at_zero(
        params, mask.masks, mask.metadata, f"The mask {source} decided this"
    )
