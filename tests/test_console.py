"""Third-party start-up lines off the console (`axolotl_fish.base.console`), in fresh processes:
importing `axolotl_fish` first (as `python -m axolotl_fish` and the demo's report do) leaves out
torchao's kernel-loading lines, torch's pytree deprecation and bitsandbytes' kernel fetch, and
keeps every other line, ours included. The control imports the libraries first, as `axolotl
train` does: it proves the lines are really printed there, so their absence is the filters'."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from axolotl_run import OFFLINE_ENV

from axolotl_fish.base.console import quiet_third_party

NOISE = (
    "Failed to load",
    "is an Enum subclass",
    "gemm_4bit_forward",
    "Skipping publisher trust check",
)
SCRIPT = """
import logging, sys
if sys.argv[1] == "libraries-first":
    import peft, torchao
import axolotl_fish
import peft, torchao  # bitsandbytes comes with PEFT
from axolotl_fish.integration import FishMaskPlugin  # Axolotl, PEFT, bitsandbytes, torchao
logging.getLogger("axolotl_fish").warning("fish_mask: our line")
logging.getLogger("torchao").warning("Failed to save: another torchao line")
"""


def start_up_output(order: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, order],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        timeout=300,
        check=True,
    )
    return result.stdout + result.stderr


def test_start_up_noise_is_dropped_and_other_lines_kept():
    quiet = start_up_output("axolotl_fish-first")
    assert [line for line in quiet.splitlines() if any(n in line for n in NOISE)] == []
    assert "fish_mask: our line" in quiet and "Failed to save: another torchao line" in quiet
    loud = start_up_output("libraries-first")
    assert all(noise in loud for noise in NOISE[:3]), loud


def test_quiet_third_party_is_idempotent():
    quiet_third_party()
    quiet_third_party()
    assert all(
        len(logging.getLogger(name).filters) == 1 for name in ("torchao", "torch.utils._pytree")
    )
