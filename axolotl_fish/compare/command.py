"""`axolotl fish-mask compare CONFIG --test HELD_OUT --out DIR` (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from axolotl_fish.compare.ladder import ladder_around
from axolotl_fish.compare.protocol import RESULTS, Comparison, Settings
from axolotl_fish.compare.runs import RunFailed


def number_list(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from err


def check_out(out: Path) -> None:
    """DIR is new, empty, or an earlier comparison's folder: never someone else's files."""
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULTS).is_file():
        raise click.ClickException(
            f"--out {out} holds files but no {RESULTS}: it is not a comparison's folder; give a "
            "new or empty folder"
        )


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--test",
    "test_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Held-out rows in the training data's format (never trained on).",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Folder for everything written."
)
@click.option("--steps", type=int, help="Training steps of every run (default: max_steps).")
@click.option(
    "--lrs",
    help="Starting LR grid, comma-separated (default: the config's LR and one "
    "ladder step each side).",
)
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated.")
@click.option(
    "--val-size",
    default=200,
    show_default=True,
    help="Validation rows taken from the training data.",
)
@click.option("--factor", default=2, show_default=True, help="Masked arms: factor x r masked to r.")
@click.option(
    "--max-answers",
    default=10,
    show_default=True,
    help="Accuracy is scored when the test answers form a closed set of at most this many.",
)
@click.option("--exact-match", is_flag=True, help="Also score greedy generation exact match.")
@click.option("--no-yours", is_flag=True, help="Leave out the config's own fish_mask block.")
@click.option("--dry-run", is_flag=True, help="Print the runs and a time estimate; train nothing.")
def compare(
    config: Path,
    train_args: tuple[str, ...],
    test_file: Path,
    out: Path,
    steps: int | None,
    lrs: str | None,
    seeds: str,
    val_size: int,
    factor: int,
    max_answers: int,
    exact_match: bool,
    no_yours: bool,
    dry_run: bool,
) -> None:
    """Does FISH help on my data? Dense adapter at the config's rank r vs FISH (factor x r masked
    to r's entries) vs random selection at the same entries, each with an LR chosen on a
    validation split, over seeds, scored on the test file: a table, a verdict and a plot in OUT.

    Arguments after `--` go to every `axolotl train` as you would give them, e.g. `-- --launcher
    accelerate -- --multi_gpu --num_processes 2`."""
    check_out(out)
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as err:
        raise click.ClickException(f"{config} is not YAML: {err}") from err
    steps = steps or raw.get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        raise click.ClickException(f"{config}: no max_steps; give --steps (every arm runs them)")
    lr = raw.get("learning_rate")
    if lrs is None and not isinstance(lr, (int, float)):
        raise click.ClickException(f"{config}: no learning_rate; give --lrs")
    settings = Settings(
        steps=steps,
        lrs=number_list(lrs, float) if lrs else tuple(ladder_around(float(lr))),
        seeds=number_list(seeds, int),
        val_size=val_size,
        factor=factor,
        max_answers=max_answers,
        exact_match=exact_match,
        yours=not no_yours,
        train_args=tuple(train_args),
    )
    if not settings.seeds or not settings.lrs:
        raise click.ClickException("--seeds and --lrs need at least one value each")
    try:
        comparison = Comparison(config, test_file, out, settings, Path.cwd(), click.echo)
        if dry_run:
            comparison.dry_run()
        else:
            comparison.run()
    except (OSError, ValueError, RunFailed) as err:
        raise click.ClickException(str(err)) from err
