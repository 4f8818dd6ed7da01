"""The built-in scorers: `fisher` (the paper), and the paper's ablations `random` and
`reverse`, registered through the same hook as third-party scorers."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from axolotl_fish.fisher.chunks import fisher_scores_in_chunks
from axolotl_fish.scorers.spec import Scorer, Scores, ScoringContext, hookimpl


def fisher(context: ScoringContext) -> Scores:
    """Diagonal Fisher information over `num_samples` training examples: higher keeps."""
    config = context.config
    result = fisher_scores_in_chunks(
        context.model,
        context.batches,
        context.params,
        config.num_samples,
        config.fisher_chunks,
        sampled_labels_seed=config.seed if config.fisher == "sampled" else None,
        progress=context.progress,
    )
    facts = {"num_examples": result.num_examples, "fisher_seconds": result.seconds}
    if config.fisher_chunks > 1:
        facts["fisher_chunks"] = config.fisher_chunks
    return Scores(scores=result.scores, metadata=facts)


def reverse(context: ScoringContext) -> Scores:
    """The least informative entries first: negated Fisher information."""
    result = fisher(context)
    result.scores = {key: -score for key, score in result.scores.items()}
    return result


def random(context: ScoringContext) -> Scores:
    """Seeded uniform scores: a random mask of the same size."""
    return Scores(scores=random_scores(context.params, context.config.seed))


def random_scores(params: Mapping[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform scores from a seeded CPU generator: the same on every rank and every machine."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.rand(p.shape, generator=generator) for key, p in params.items()}


@hookimpl
def fish_mask_scorers() -> Mapping[str, Scorer]:
    return {"fisher": fisher, "random": random, "reverse": reverse}
