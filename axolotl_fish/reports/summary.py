"""Human-readable account of a mask: where the budget went and what decided it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

from axolotl_fish.adapters.tensors import layer_index, natural_order, tensor_role
from axolotl_fish.masks.file import FishMask


def module_type(key: str) -> str:
    return tensor_role(key)[0]


def matrix(key: str) -> str:
    return tensor_role(key)[1]


def layer(key: str) -> str:
    index = layer_index(key)
    return "other" if index is None else str(index)


def percent(kept: int, total: int, digits: int = 2) -> str:
    """`kept / total` as a percentage; "n/a" for no entries (a mask or group of 0 entries)."""
    return f"{kept / total:.{digits}%}" if total else "n/a"


def selected_fractions(
    masks: Mapping[str, torch.Tensor], group: Callable[[str], str]
) -> dict[str, tuple[int, int]]:
    """(selected, total) entries per group of tensors (`group` names a key's group), in
    natural order."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, mask in masks.items():
        counts = groups[group(key)]
        counts[0] += int(mask.sum())
        counts[1] += mask.numel()
    return {
        name: (kept, total)
        for name, (kept, total) in sorted(groups.items(), key=lambda item: natural_order(item[0]))
    }


def summarize(mask: FishMask) -> str:
    """Multi-line summary: k of total, the pass, and the selected fraction per module and matrix."""
    meta = mask.metadata
    lines = [
        f"FISH mask: {mask.k:,} of {mask.total:,} candidate entries trainable "
        f"({percent(mask.k, mask.total)}), strategy={meta.get('strategy')}, "
        f"scope={meta.get('scope', 'global')}, seed={meta.get('seed')}",
    ]
    if meta.get("num_examples") is not None:
        lines.append(
            f"  Fisher pass: {meta['num_examples']} examples in "
            f"{meta.get('fisher_seconds', 0):.1f} s"
        )
    if meta.get("dense_outside"):
        lines.append(
            f"  outside the mask: {meta['dense_outside']:,} entries train densely "
            f"(include={meta.get('include')}, exclude={meta.get('exclude')})"
        )
    for title, group in (("module", module_type), ("matrix", matrix)):
        parts = [
            f"{name} {percent(kept, total, 1)}"
            for name, (kept, total) in selected_fractions(mask.masks, group).items()
        ]
        lines.append(f"  selected per {title}: " + ", ".join(parts))
    for tie in meta.get("tie_breaks", []):
        lines.append(
            f"  ties: {tie['chosen']:,} entries drawn at random (seed {meta.get('seed')}) among "
            f"{tie['tied']:,} with equal score {tie['score']:.3g}"
        )
    if meta.get("modules_fixed_at_zero"):
        fixed = meta["modules_fixed_at_zero"]
        lines.append(
            f"  update fixed at 0: {len(fixed)} module(s) with no selected entry on their "
            f"all-zero output side, e.g. {fixed[0]}"
        )
    return "\n".join(lines)
