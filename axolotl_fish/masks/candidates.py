"""Which trainable tensors the mask governs: all of them, or those `include`/`exclude` pick.

A tensor outside the candidates is left exactly as the training setup made it: it keeps
requiring gradients and trains densely, outside the budget k (it has no mask entry and no hook).
Freezing is the setup's job (which modules an adapter targets, Axolotl's
`unfrozen_parameters`); the mask only decides which entries of the candidates move.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from axolotl_fish.masks.file import FishMask


def select_candidates(
    trainable: Mapping[str, nn.Parameter],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    owner: str = "fish_mask.",
) -> dict[str, nn.Parameter]:
    """The tensors whose saved name matches an `include` pattern (all, if None) and no `exclude`
    pattern (`re.search`). A pattern that matches no trainable tensor is an error: it is
    almost always a typo, and silently ignoring it would change what the budget counts.
    `owner` prefixes the field in errors: the config key, or the mask file that recorded it."""
    for field, patterns in (("include", include), ("exclude", exclude)):
        unmatched = [p for p in patterns or () if not any(re.search(p, key) for key in trainable)]
        if unmatched:
            raise ValueError(
                f"{owner}{field} pattern(s) {unmatched} match no trainable tensor; names look "
                f"like {next(iter(trainable))!r}."
            )
    candidates = {
        key: param
        for key, param in trainable.items()
        if (include is None or any(re.search(p, key) for p in include))
        and not any(re.search(p, key) for p in exclude or ())
    }
    if not candidates:
        raise ValueError(
            f"{owner}include={include} with exclude={exclude} leaves no tensor to mask."
        )
    return candidates


def governed_by(
    mask: FishMask, trainable: Mapping[str, nn.Parameter], source: str = "the mask"
) -> dict[str, nn.Parameter]:
    """The tensors a saved mask governs among a model's `trainable` ones: its own recorded
    include/exclude (not the config's); errors blame the mask read from `source`."""
    meta = mask.metadata
    owner = f"{source}: the mask's recorded "
    return select_candidates(trainable, meta.get("include"), meta.get("exclude"), owner)
