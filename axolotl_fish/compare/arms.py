"""The arms of a comparison, derived from the user's Axolotl config at equal trainable entries.

With the config's adapter at rank r (LoRA / QLoRA `lora_r`) or size s (`bottleneck.size`):

- dense:  the adapter at r, every entry trains (the plugin at `keep_ratio: 1.0, strategy:
          random`: no Fisher pass, only so that its initialisation is seeded like the others');
- fisher: the adapter at factor x r, masked to r's entries (`match_rank: r`), top Fisher scores;
- random: the same adapter and k, a seeded random selection (the paper's control);
- yours:  the config's own `fish_mask:` block as written, when it has one (its own budget).

A masked arm scales `lora_alpha` with the rank (alpha / r stays the config's). The config's other
`fish_mask` settings that do not change which entries are candidates (num_samples, fisher,
fisher_chunks, score_after_sharding) carry over to the fisher and random arms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLUGIN = "axolotl_fish.FishMaskPlugin"
CARRIED_FISH_KEYS = ("num_samples", "fisher", "fisher_chunks", "score_after_sharding")
DENSE_MASK = {"keep_ratio": 1.0, "strategy": "random"}


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict[str, Any]  # top-level config keys this arm sets
    fish_mask: dict[str, Any] = field(default_factory=dict)
    equal: bool = True  # trains exactly the dense arm's number of entries

    def config(self, base: dict[str, Any], seed: int) -> dict[str, Any]:
        """`base` with this arm's adapter keys, the plugin and its `fish_mask` block (seeded)."""
        config = {**copy.deepcopy(base), **copy.deepcopy(self.overrides)}
        plugins = [p for p in config.get("plugins") or [] if p != PLUGIN]
        config["plugins"] = [*plugins, PLUGIN]
        config["fish_mask"] = {**self.fish_mask, "seed": seed}
        return config


def adapter_size(config: dict[str, Any], config_path: Path) -> tuple[str, int]:
    """("lora", r) or ("bottleneck", s) from the config; ValueError naming the key otherwise."""
    adapter = config.get("adapter")
    if adapter in ("lora", "qlora"):
        rank = config.get("lora_r")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{config_path}: lora_r must be a positive integer (got {rank!r})")
        return "lora", rank
    if adapter == "bottleneck":
        size = (config.get("bottleneck") or {}).get("size")
        if not isinstance(size, int) or size < 1:
            raise ValueError(
                f"{config_path}: bottleneck.size must be a positive integer (got {size!r})"
            )
        return "bottleneck", size
    raise ValueError(
        f"{config_path}: adapter is {adapter!r}; compare needs adapter: lora, qlora or bottleneck"
    )


def sized(config: dict[str, Any], kind: str, size: int, base_size: int) -> dict[str, Any]:
    """The top-level keys that set the adapter to `size` (alpha scaled with a LoRA rank)."""
    if kind == "bottleneck":
        return {"bottleneck": {**config["bottleneck"], "size": size}}
    keys: dict[str, Any] = {"lora_r": size}
    if "lora_alpha" in config:
        keys["lora_alpha"] = config["lora_alpha"] * size // base_size
    return keys


def derive_arms(
    config: dict[str, Any], config_path: Path, factor: int = 2, yours: bool = True
) -> list[Arm]:
    """The arms for `config` (see the module docstring); the dense arm comes first."""
    if factor < 2:
        raise ValueError(f"--factor {factor}: the masked adapter must be at least 2x the dense one")
    kind, r = adapter_size(config, config_path)
    letter = "r" if kind == "lora" else "s"
    label = f"{'LoRA' if kind == 'lora' else 'Adapter'} {letter}"
    own = config.get("fish_mask") or {}
    carried = {key: own[key] for key in CARRIED_FISH_KEYS if key in own}
    wide = sized(config, kind, factor * r, r)
    arms = [
        Arm(f"dense {label}{r}", sized(config, kind, r, r), dict(DENSE_MASK)),
        *[
            Arm(
                f"{strategy} {label}{factor * r}->{letter}{r}",
                wide,
                {**carried, "match_rank": r, "strategy": strategy},
            )
            for strategy in ("fisher", "random")
        ],
    ]
    if yours and own:
        arms.append(Arm("your fish_mask", {}, {k: v for k, v in own.items() if k != "seed"}, False))
    return arms
