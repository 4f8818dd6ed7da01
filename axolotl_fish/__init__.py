"""FISH-Tuning for Axolotl: train only the adapter entries with the highest Fisher information.

The core (`compute_fish_mask`, `FishMask`, `FishMaskCallback`) works with any PEFT model and HF
`Trainer`; `FishMaskPlugin` is the Axolotl plugin (`plugins: [axolotl_fish.FishMaskPlugin]`),
imported lazily so the core does not import Axolotl.
"""

from __future__ import annotations

from typing import Any

from axolotl_fish.compute import compute_fish_mask
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.mask_file import MASK_FILENAME, FishMask

__all__ = [
    "MASK_FILENAME",
    "FishMask",
    "FishMaskCallback",
    "FishMaskConfig",
    "FishMaskPlugin",
    "compute_fish_mask",
]


def __getattr__(name: str) -> Any:
    if name == "FishMaskPlugin":
        from axolotl_fish.integration import FishMaskPlugin

        return FishMaskPlugin
    if name == "FishMaskCallback":
        from axolotl_fish.callback import FishMaskCallback

        return FishMaskCallback
    raise AttributeError(f"module 'axolotl_fish' has no attribute {name!r}")
