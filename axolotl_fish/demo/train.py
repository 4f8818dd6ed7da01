"""`make demo`'s training step: Axolotl's own `axolotl train CONFIG --launcher python` (training in
this one process), started after `axolotl_fish` is imported, so that the start-up lines about
optional kernels torchao, torch and bitsandbytes print on a CPU-only, offline machine stay off
the console (`axolotl_fish.base.console`). Plain `axolotl train` imports those libraries before
it loads any plugin, and prints them.

    python -m axolotl_fish.demo.train CONFIG [axolotl train options]
"""

from __future__ import annotations

import sys

from axolotl.cli.main import cli

import axolotl_fish  # noqa: F401 - first: importing it installs the filters


def main(argv: list[str] | None = None) -> None:
    cli(["train", *(sys.argv[1:] if argv is None else argv), "--launcher", "python"])


if __name__ == "__main__":
    main()
