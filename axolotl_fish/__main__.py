"""`python -m axolotl_fish`: the `axolotl fish-mask` commands without the axolotl CLI."""

from axolotl_fish.cli import fish_mask

fish_mask()
