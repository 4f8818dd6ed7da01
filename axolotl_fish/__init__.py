"""FISH-Tuning for Axolotl: train only the adapter entries with the highest Fisher information.

The core (`compute_fish_mask`, `FishMask`, `FishMaskCallback`) works with any PEFT model and HF
`Trainer`; `FishMaskPlugin` is the Axolotl plugin (`plugins: [axolotl_fish.FishMaskPlugin]`),
imported lazily so the core does not import Axolotl.

Rooms, by floor (a module imports only its own room and lower floors; tests/test_layout.py checks):
1 `base`, `config` - 2 `adapters`, `fisher` - 3 `masks`, `scorers` - 4 `training`, `reports` -
5 `pipeline`, `distributed` - 6 `integration` (Axolotl) - 7 `compare`, `demo` - 8 `cli`.
"""

from __future__ import annotations

from typing import Any

from axolotl_fish.base.console import quiet_third_party

quiet_third_party()  # before the imports below load torchao and bitsandbytes

from axolotl_fish.config import FishMaskConfig  # noqa: E402
from axolotl_fish.masks.file import MASK_FILENAME, FishMask  # noqa: E402
from axolotl_fish.pipeline.compute import compute_fish_mask  # noqa: E402

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
        from axolotl_fish.training.callback import FishMaskCallback

        return FishMaskCallback
    raise AttributeError(f"module 'axolotl_fish' has no attribute {name!r}")
