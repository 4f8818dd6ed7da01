"""`axolotl fish-mask ...` (Axolotl's `axolotl.cli_commands` entry point) and
`python -m axolotl_fish ...`: compute, inspect and compare mask files; apply a delta; compare
FISH with dense and random training on your data (`compare`, from the compare room)."""

from __future__ import annotations

from pathlib import Path

import click

from axolotl_fish.compare.command import compare
from axolotl_fish.masks.file import FishMask
from axolotl_fish.masks.source import load_mask


def _load(source: str) -> FishMask:
    """A mask file, a folder holding one, or a Hub reference (`hf://org/name[@rev][/path]`)."""
    try:
        return load_mask(source)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err


@click.group(name="fish-mask")
def fish_mask() -> None:
    """FISH masks: compute one from a config, inspect one, compare two; apply a sparse delta."""


@fish_mask.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="File or folder to write (default: the config's output_dir/fish_mask.safetensors).",
)
def compute(config: Path, output: Path | None) -> None:
    """Load model and data exactly as `axolotl train CONFIG` would, run the scoring pass and
    write the mask (usable as fish_mask.mask_path); no training."""
    from axolotl_fish.integration.standalone import compute_mask_for_config

    try:
        mask, default = compute_mask_for_config(config)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    target = output or default
    target.parent.mkdir(parents=True, exist_ok=True)
    path = mask.save(target)
    click.echo(f"{mask.k:,} of {mask.total:,} entries selected; mask written to {path}")


@fish_mask.command()
@click.argument("mask")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap.")
@click.option("--tensors", is_flag=True, help="Also list every tensor.")
@click.option(
    "--card", is_flag=True, help="Print the FISH-Tuning section of the model card instead."
)
def inspect(mask: str, png: Path | None, tensors: bool, card: bool) -> None:
    """Metadata, k of total, and the selected fraction per layer, module type and matrix.

    MASK is a mask file, a folder holding fish_mask.safetensors (an adapter's output_dir or
    checkpoint), or a Hub reference hf://org/name[@revision][/path]."""
    loaded = _load(mask)
    if png is not None:  # before any output, so a bad --png is the only line
        if not loaded.masks:
            raise click.ClickException(f"{mask} holds no tensors: there is no heatmap to draw.")
        try:
            png.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise click.ClickException(f"--png {png}: {err}") from err
    if card:
        from axolotl_fish.reports.model_card import card_section

        click.echo(card_section(loaded, mask), nl=False)
    else:
        from axolotl_fish.reports.text import inspect_report

        click.echo(inspect_report(loaded, mask, per_tensor=tensors))
    if png is not None:
        from axolotl_fish.reports.heatmap import heatmap_title, save_heatmap

        title = heatmap_title(loaded, mask)
        try:
            written = save_heatmap(loaded, png, title)
        except OSError as err:
            raise click.ClickException(f"--png {png}: {err}") from err
        click.echo(f"heatmap written to {written}")


@fish_mask.command()
@click.argument("mask_a")
@click.argument("mask_b")
def diff(mask_a: str, mask_b: str) -> None:
    """Overlap of two masks of the same adapter: intersection, Jaccard, per module type.

    Each mask is a file, a folder holding one, or a Hub reference (hf://...)."""
    from axolotl_fish.reports.text import diff_report

    a, b = _load(mask_a), _load(mask_b)
    try:
        click.echo(diff_report(a, b, mask_a, mask_b))
    except ValueError as err:
        message = f"{mask_a} and {mask_b} do not cover the same tensors: {err}"
        raise click.ClickException(message) from err


@fish_mask.command()
@click.argument("base_model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("delta", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def apply(base_model: Path, delta: Path, out_dir: Path) -> None:
    """Rebuild a full-parameter FISH model: BASE_MODEL's folder with DELTA (a
    fish_delta.safetensors, or a folder holding one) applied, written to OUT_DIR (a new or empty
    folder outside BASE_MODEL). Refuses a delta made on another base model."""
    from axolotl_fish.training.delta import apply_delta

    try:
        path = apply_delta(base_model, delta, out_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{path} written: {base_model} with the delta {delta} applied")


fish_mask.add_command(compare)
