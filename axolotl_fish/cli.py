"""`axolotl fish-mask ...` (Axolotl's `axolotl.cli_commands` entry point) and
`python -m axolotl_fish ...`: compute, inspect and compare mask files."""

from __future__ import annotations

from pathlib import Path

import click

from axolotl_fish.mask_file import FishMask


def _load(path: Path) -> FishMask:
    try:
        return FishMask.load(path)
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
@click.argument("mask", type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap.")
@click.option("--tensors", is_flag=True, help="Also list every tensor.")
def inspect(mask: Path, png: Path | None, tensors: bool) -> None:
    """Metadata, k of total, and the selected fraction per layer, module type and matrix."""
    from axolotl_fish.report import inspect_report

    loaded = _load(mask)
    click.echo(inspect_report(loaded, str(mask), per_tensor=tensors))
    if png is not None:
        from axolotl_fish.heatmap import save_heatmap

        meta = loaded.metadata
        title = (
            f"{mask.name}\n{loaded.k:,} of {loaded.total:,} entries selected "
            f"({loaded.k / loaded.total:.1%}), strategy={meta.get('strategy', '?')}"
        )
        click.echo(f"heatmap written to {save_heatmap(loaded, png, title)}")


@fish_mask.command()
@click.argument("mask_a", type=click.Path(path_type=Path))
@click.argument("mask_b", type=click.Path(path_type=Path))
def diff(mask_a: Path, mask_b: Path) -> None:
    """Overlap of two masks of the same adapter: intersection, Jaccard, per module type."""
    from axolotl_fish.report import diff_report

    a, b = _load(mask_a), _load(mask_b)
    try:
        click.echo(diff_report(a, b, str(mask_a), str(mask_b)))
    except ValueError as err:
        message = f"{mask_a} and {mask_b} do not cover the same tensors: {err}"
        raise click.ClickException(message) from err


@fish_mask.command()
@click.argument("base_model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("delta", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def apply(base_model: Path, delta: Path, out_dir: Path) -> None:
    """Rebuild a full-parameter FISH model: BASE_MODEL's folder with DELTA (a
    fish_delta.safetensors, or a folder holding one) applied, written to OUT_DIR. Refuses a
    delta made on another base model."""
    from axolotl_fish.sparse_delta import apply_delta

    try:
        path = apply_delta(base_model, delta, out_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{path} written: {base_model} with the delta {delta} applied")
