"""The Fisher pass in chunks of tensors, for candidates whose fp32 scores do not fit on the device.

One pass holds an fp32 score for every candidate entry on the model's device (4 bytes per weight:
27 GB for a 7B model in full-parameter mode, more than its sparse training needs). In chunks,
the candidates are split into `chunks` groups of consecutive tensors with about equal entry
counts; each group is scored by its own pass over the same micro-batches (read from the data once
and replayed), and its scores move to CPU memory before the next group's pass. The device then
holds one group's scores at a time, at the cost of one forward+backward per group and example.
Every tensor's score is the same sum over the same examples as in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from axolotl_fish.fisher.scores import FisherScores, fisher_scores

LOG = logging.getLogger(__name__)


class _Replay:
    """Iterates `batches` once, keeping what was read; later passes read the kept batches."""

    def __init__(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        self._source: Iterable[Mapping[str, torch.Tensor]] | None = batches
        self._read: list[Mapping[str, torch.Tensor]] = []

    def __iter__(self) -> Iterator[Mapping[str, torch.Tensor]]:
        if self._source is None:
            yield from self._read
            return
        source, self._source = self._source, None
        for batch in source:
            self._read.append(batch)
            yield batch


def tensor_chunks(params: Mapping[str, nn.Parameter], chunks: int) -> list[dict[str, nn.Parameter]]:
    """`params` in order, cut into at most `chunks` groups of about equal entry counts (a
    tensor is never split; a group closes once it reaches its share of the entries)."""
    total = sum(p.numel() for p in params.values())
    groups: list[dict[str, nn.Parameter]] = [{}]
    filled = 0
    for key, param in params.items():
        if groups[-1] and filled >= total * len(groups) / chunks:
            groups.append({})
        groups[-1][key] = param
        filled += param.numel()
    return groups


def fisher_scores_in_chunks(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, nn.Parameter],
    num_samples: int,
    chunks: int,
    **options: Any,
) -> FisherScores:
    """`fisher_scores` over `chunks` groups of tensors, one pass each; with more than one group
    the scores are returned in CPU memory (`options` go to every pass)."""
    groups = tensor_chunks(params, chunks)
    if len(groups) == 1:
        return fisher_scores(model, batches, params, num_samples, **options)
    LOG.info(
        f"Fisher pass in {len(groups)} chunks of tensors (fish_mask.fisher_chunks={chunks}): "
        f"at most {max(sum(p.numel() for p in g.values()) for g in groups):,} fp32 scores on "
        f"the device at a time, the rest in CPU memory"
    )
    replay = _Replay(batches)
    scores: dict[str, torch.Tensor] = {}
    seconds = 0.0
    for group in groups:
        result = fisher_scores(model, replay, group, num_samples, **options)
        scores |= {key: score.cpu() for key, score in result.scores.items()}
        seconds += result.seconds
    return FisherScores(scores=scores, num_examples=result.num_examples, seconds=seconds)
