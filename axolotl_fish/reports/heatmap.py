"""A picture of a mask: layers down, module types across, colour = fraction selected."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from axolotl_fish.masks.file import FishMask
from axolotl_fish.reports.summary import layer, module_type, percent, selected_fractions

# Cells are labelled with their percentage while they stay readable.
_MAX_LABELLED_CELLS = 600
# Where the demo writes the picture: beside the adapter and its mask.
HEATMAP_FILENAME = "fish_mask_heatmap.png"


def heatmap_title(mask: FishMask, source: str) -> str:
    """Where the mask came from, k of total and the strategy."""
    return (
        f"{source}\n{mask.k:,} of {mask.total:,} entries selected "
        f"({percent(mask.k, mask.total, 1)}), strategy={mask.metadata.get('strategy', '?')}"
    )


def heatmap_grid(mask: FishMask) -> tuple[list[str], list[str], np.ndarray]:
    """(layers, module types, fraction selected per cell); NaN where no tensor is."""
    rows = list(selected_fractions(mask.masks, layer))
    cols = list(selected_fractions(mask.masks, module_type))
    cells = selected_fractions(mask.masks, lambda key: f"{layer(key)} {module_type(key)}")
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            if f"{row} {col}" in cells:
                kept, total = cells[f"{row} {col}"]
                grid[i, j] = kept / total if total else np.nan
    return rows, cols, grid


def save_heatmap(mask: FishMask, path: str | os.PathLike[str], title: str) -> Path:
    """Write a PNG heatmap; cells without an adapter tensor stay blank (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, grid = heatmap_grid(mask)

    fig, ax = plt.subplots(
        figsize=(max(6.0, 2.5 + 0.9 * len(cols)), 2.4 + 0.3 * len(rows)), layout="constrained"
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if grid.size <= _MAX_LABELLED_CELLS:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="fraction of entries selected")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
