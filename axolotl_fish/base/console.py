"""Third-party start-up lines kept off the console: messages about optional kernels that are
expected on a CPU-only, offline machine and that a newcomer reads as errors. Each is dropped by
its exact logger (or warning origin) and message; every other line of those libraries stays.

Installed when `axolotl_fish` is imported, before the package imports torch, PEFT or
transformers (which import torchao and bitsandbytes): whatever process imports `axolotl_fish`
first (`python -m axolotl_fish`, the demo's report) prints none of them. A process that imports
Axolotl first (`axolotl train`) has printed them before any plugin loads.
"""

from __future__ import annotations

import logging
import re
import warnings

# logger name -> the start of the messages dropped from it
DROPPED: dict[str, re.Pattern[str]] = {
    # torchao's optional CUDA extensions (mxfp8, cutlass) cannot load on a CPU build of torch.
    "torchao": re.compile(r"Failed to load \S+\.so: "),
    # torchao registers enums with torch.utils._pytree, which torch 2.13 deprecates.
    "torch.utils._pytree": re.compile(
        r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile"
    ),
    # bitsandbytes fetches an optimised CPU 4-bit kernel from the Hub; offline it falls back to
    # its own torch code.
    "bitsandbytes.backends.cpu.ops": re.compile(
        r"Failed to load CPU gemm_4bit_forward from kernels-community: "
    ),
}
# bitsandbytes' Hub fetch above, offline (a UserWarning raised from its CPU backend).
KERNEL_TRUST_WARNING = r"Skipping publisher trust check for 'kernels-community/"
KERNEL_WARNING_MODULE = r"bitsandbytes\.backends\.cpu\.ops"


class _DropMatching(logging.Filter):
    """Drops the records whose message starts with `pattern`."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def quiet_third_party() -> None:
    """Drop the messages in `DROPPED` and the kernel trust warning (idempotent)."""
    for name, pattern in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    warnings.filterwarnings(
        "ignore", message=KERNEL_TRUST_WARNING, category=UserWarning, module=KERNEL_WARNING_MODULE
    )
