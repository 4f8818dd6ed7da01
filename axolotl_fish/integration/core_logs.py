"""The core's log lines under Axolotl.

The core logs with plain `logging.getLogger(__name__)`. Under Axolotl those loggers inherit the
root logger's level (WARNING), so the core's INFO lines - what the Fisher pass decided (chunks,
gradient checkpointing, the one-example path) and which bottleneck adapters it built or loaded -
were dropped before Axolotl's handlers, which pass `axolotl*` records at AXOLOTL_LOG_LEVEL, could
show them.
"""

from __future__ import annotations

import logging

from axolotl.utils.distributed import is_main_process

CORE_LOGGER = "axolotl_fish"


def show_core_logs() -> None:
    """Let the core's records reach Axolotl's handlers, as Axolotl's `get_logger` does for its
    own loggers, on the first process only (like Axolotl's own INFO lines); the other processes
    keep WARNING, so a line is not repeated once per rank."""
    level = logging.DEBUG if is_main_process() else logging.WARNING
    logging.getLogger(CORE_LOGGER).setLevel(level)
