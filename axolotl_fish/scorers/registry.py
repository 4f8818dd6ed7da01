"""Scorers by name: the built-ins plus every installed `axolotl_fish.scorers` entry point.

A third-party package declares, in its pyproject.toml,
`[project.entry-points."axolotl_fish.scorers"] my_scorers = "my_package.scorers"`, where the
module has a `@hookimpl def fish_mask_scorers()` returning `{name: scorer}`.
"""

from __future__ import annotations

from functools import cache

import pluggy
import torch

from axolotl_fish.scorers import builtin
from axolotl_fish.scorers.spec import PROJECT, Scorer, ScorerSpec, Scores, ScoringContext

ENTRY_POINT_GROUP = "axolotl_fish.scorers"


@cache
def plugin_manager() -> pluggy.PluginManager:
    """Loaded once a process; entry points are read from the installed distributions."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(ScorerSpec)
    manager.register(builtin, name="axolotl_fish.builtin")
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def available_scorers() -> dict[str, Scorer]:
    """Every scorer by name; a name provided twice is an error naming both plugins."""
    scorers: dict[str, Scorer] = {}
    owners: dict[str, str] = {}
    for impl in plugin_manager().hook.fish_mask_scorers.get_hookimpls():
        for name, scorer in impl.function().items():
            if name in owners:
                raise ValueError(
                    f"Scorer name {name!r} is provided by both {owners[name]!r} and "
                    f"{impl.plugin_name!r} (entry-point group {ENTRY_POINT_GROUP!r})."
                )
            scorers[name], owners[name] = scorer, impl.plugin_name
    return dict(sorted(scorers.items()))


def check_strategy(name: str) -> str:
    """`name` if a scorer has it, else an error listing the ones there are."""
    names = list(available_scorers())
    if name not in names:
        choices = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(
            f"unknown scorer {name!r}: expected {choices} (more are installed as "
            f"{ENTRY_POINT_GROUP!r} entry points)"
        )
    return name


def score(name: str, context: ScoringContext) -> Scores:
    """Run scorer `name` and check that it scored every entry of `context.params`."""
    result = available_scorers()[check_strategy(name)](context)
    scores = result.scores
    missing = sorted(set(context.params) - set(scores))
    if missing:
        raise ValueError(f"Scorer {name!r} returned no score for tensor {missing[0]!r}.")
    unknown = sorted(set(scores) - set(context.params))
    if unknown:
        raise ValueError(f"Scorer {name!r} scored {unknown[0]!r}, which is not an adapter tensor.")
    for key, param in context.params.items():
        value = scores[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"Scorer {name!r} returned {shape} for tensor {key!r}, expected a tensor of "
                f"shape {tuple(param.shape)}."
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(
                f"Scorer {name!r} returned non-finite or non-float scores for tensor {key!r}."
            )
    return result
