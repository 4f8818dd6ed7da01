"""What `fish-mask inspect` and `fish-mask diff` print: where a mask's budget went, and how
much two masks over the same adapter agree."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from axolotl_fish.adapters.tensors import natural_order
from axolotl_fish.masks.file import FishMask
from axolotl_fish.reports.summary import layer, matrix, module_type, percent, selected_fractions

GROUPINGS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("layer", layer),
    ("module type", module_type),
    ("matrix", matrix),
)


def _fraction_lines(title: str, fractions: dict[str, tuple[int, int]]) -> list[str]:
    width = max((len(name) for name in fractions), default=0)
    lines = [f"selected per {title}:"]
    for name, (kept, total) in fractions.items():
        lines.append(f"  {name:<{width}}  {kept:>12,} / {total:>12,}  {percent(kept, total):>7}")
    return lines


def inspect_report(mask: FishMask, source: str, per_tensor: bool = False) -> str:
    """Metadata, k of total, and the selected fraction per layer, module type and matrix
    (and per tensor with `per_tensor`)."""
    lines = [
        f"{source}",
        f"k = {mask.k:,} of {mask.total:,} entries selected ({percent(mask.k, mask.total)}) "
        f"in {len(mask.masks)} tensors",
        "metadata:",
    ]
    width = max((len(key) for key in mask.metadata), default=0)
    lines += [
        f"  {key:<{width}}  {json.dumps(mask.metadata[key])}" for key in sorted(mask.metadata)
    ]
    groupings = [*GROUPINGS, ("tensor", str)] if per_tensor else GROUPINGS
    for title, group in groupings:
        lines += _fraction_lines(title, selected_fractions(mask.masks, group))
    return "\n".join(lines)


@dataclass(frozen=True)
class Overlap:
    """Selected entries of two masks over the same `total` entries."""

    a: int
    b: int
    both: int
    total: int

    @property
    def jaccard(self) -> float:
        union = self.a + self.b - self.both
        return self.both / union if union else 1.0

    @property
    def expected_by_chance(self) -> float:
        """Entries two independent uniformly random masks of these sizes share on average."""
        return self.a * self.b / self.total if self.total else 0.0


def overlaps(
    a: FishMask, b: FishMask, group: Callable[[str], str] = lambda key: "all"
) -> dict[str, Overlap]:
    """Overlap per group of tensors; both masks must cover the same tensors with equal shapes."""
    for key in sorted(set(a.masks) ^ set(b.masks)):
        raise ValueError(f"Tensor {key!r} is only in mask {'A' if key in a.masks else 'B'}.")
    for key, left in a.masks.items():
        if left.shape != b.masks[key].shape:
            raise ValueError(
                f"Tensor {key!r} has shape {tuple(left.shape)} in mask A and "
                f"{tuple(b.masks[key].shape)} in mask B."
            )
    counts: dict[str, list[int]] = {}
    for key, left in a.masks.items():
        right = b.masks[key]
        row = counts.setdefault(group(key), [0, 0, 0, 0])
        row[0] += int(left.sum())
        row[1] += int(right.sum())
        row[2] += int(torch.logical_and(left, right).sum())
        row[3] += left.numel()
    return {name: Overlap(*counts[name]) for name in sorted(counts, key=natural_order)}


def diff_report(a: FishMask, b: FishMask, source_a: str, source_b: str) -> str:
    """Overall and per-group overlap of two masks, and the metadata in which they differ."""
    whole = overlaps(a, b).get("all", Overlap(0, 0, 0, 0))  # a mask with no tensors
    lines = [
        f"A: {source_a}",
        f"B: {source_b}",
        f"total entries      {whole.total:,}",
        f"selected in A      {whole.a:,} ({percent(whole.a, whole.total)})",
        f"selected in B      {whole.b:,} ({percent(whole.b, whole.total)})",
        f"in both            {whole.both:,} (random masks of these sizes share "
        f"{whole.expected_by_chance:,.0f} on average)",
        f"only in A          {whole.a - whole.both:,}",
        f"only in B          {whole.b - whole.both:,}",
        f"Jaccard            {whole.jaccard:.4f}",
    ]
    for title, group in GROUPINGS[1:]:
        parts = overlaps(a, b, group)
        heading = f"per {title}:"
        width = max([len(heading) - 2, *(len(name) for name in parts)])
        lines.append(f"{heading:<{width + 2}}{'in A':>12}{'in B':>12}{'in both':>12}{'Jaccard':>9}")
        lines += [
            f"  {name:<{width}}{o.a:>12,}{o.b:>12,}{o.both:>12,}{o.jaccard:>9.4f}"
            for name, o in parts.items()
        ]
    differing = sorted(
        key
        for key in set(a.metadata) | set(b.metadata)
        if a.metadata.get(key) != b.metadata.get(key)
        and key not in ("fisher_seconds", "tie_breaks")
    )
    lines.append("metadata that differs:" if differing else "metadata: the same")
    lines += [
        f"  {key}: A {json.dumps(a.metadata.get(key))}, B {json.dumps(b.metadata.get(key))}"
        for key in differing
    ]
    return "\n".join(lines)
