"""Human-readable account of a mask: where the budget went and what decided it."""

from __future__ import annotations

from collections import defaultdict

import torch

from axolotl_fish.adapter_tensors import tensor_role
from axolotl_fish.mask_file import FishMask


def selected_fractions(masks: dict[str, torch.Tensor], by: int) -> dict[str, tuple[int, int]]:
    """(selected, total) entries grouped by module type (`by=0`) or matrix (`by=1`)."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, mask in masks.items():
        group = groups[tensor_role(key)[by]]
        group[0] += int(mask.sum())
        group[1] += mask.numel()
    return {name: (kept, total) for name, (kept, total) in sorted(groups.items())}


def summarize(mask: FishMask) -> str:
    """Multi-line summary: k of total, the pass, and the selected fraction per module and matrix."""
    meta = mask.metadata
    lines = [
        f"FISH mask: {mask.k:,} of {mask.total:,} candidate entries trainable "
        f"({mask.k / mask.total:.2%}), strategy={meta.get('strategy')}, "
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
    for title, by in (("module", 0), ("matrix", 1)):
        parts = [
            f"{name} {kept / total:.1%}"
            for name, (kept, total) in selected_fractions(mask.masks, by).items()
        ]
        lines.append(f"  selected per {title}: " + ", ".join(parts))
    for tie in meta.get("tie_breaks", []):
        lines.append(
            f"  ties: {tie['chosen']:,} entries drawn at random (seed {meta.get('seed')}) among "
            f"{tie['tied']:,} with equal score {tie['score']:.3g}"
        )
    return "\n".join(lines)
