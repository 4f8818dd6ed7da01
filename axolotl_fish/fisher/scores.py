"""Diagonal empirical Fisher information of candidate entries (adapter or model weights).

F_i = mean over examples n of (d loss_n / d theta_i)^2, where loss_n is example n's own mean
next-token loss over its label tokens (what a batch-size-1 run minimises). Squares are taken per
example, never of a batch gradient, and accumulated in fp32.

Two paths compute the same numbers:
- Batched path (one forward and one backward per micro-batch, no weight gradient): every tensor
  a rule of `fisher_rules` claims - any plain `nn.Linear` / `Conv1D` (LoRA factors of plain LoRA
  and DoRA linear layers, a full model's projections and head, other adapters' linear layers),
  embeddings (a model's own, tied ones with both uses, LoRA and DoRA embeddings), normalisation
  weights and DoRA magnitudes. A linear layer's per-example weight gradient is sum_t g_t x_t^T,
  formed from its recorded inputs x and output gradients g; embeddings from the token ids and
  the output gradient.
- Generic path: every other trainable tensor (layers with their own forward, such as
  `llama-adapter`'s, tensors shared between modules): one forward and backward per example,
  gradients of that example only.

`empirical` Fisher uses the data's labels (the paper); `sampled` Fisher replaces each label token
by a draw from the model's own predictive distribution (the true Fisher). A draw depends only on
(seed, example index, position), so both paths draw the same labels.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from axolotl_fish.base.ranks import any_rank, rank_and_world, share_of, sum_over_ranks
from axolotl_fish.base.rng import preserved_rng_state
from axolotl_fish.base.sharded import is_sharded
from axolotl_fish.fisher.checkpointing import checkpointed_layers, checkpointing_enabled
from axolotl_fish.fisher.taps import RuleTaps

LOG = logging.getLogger(__name__)
IGNORE_INDEX = -100
MIN_LOGIT_POSITIONS = 8


@dataclass
class FisherScores:
    """Per-entry Fisher information (fp32, mean over examples) and how it was obtained."""

    scores: dict[str, torch.Tensor]
    num_examples: int
    seconds: float


def label_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean cross-entropy over its label tokens (logits[:, p] predicts targets[:, p];
    -100 marks no label), and whether it has any.

    Only label positions are upcast to fp32, so memory scales with label tokens, not the full
    batch x sequence x vocabulary logits.
    """
    valid = targets != IGNORE_INDEX
    rows = valid.nonzero()[:, 0]
    token_loss = F.cross_entropy(logits[valid].float(), targets[valid], reduction="none")
    counts = valid.sum(dim=1)
    sums = torch.zeros(targets.shape[0], device=logits.device).index_add_(0, rows, token_loss)
    return sums / counts.clamp(min=1), counts > 0


def sampled_targets(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    first_index: int,
    seed: int,
) -> torch.Tensor:
    """Targets with every label token replaced by a draw from softmax(logits) at its position,
    for aligned logits and targets taken at `positions` of a row's next-token targets.

    Inverse-CDF sampling with one uniform per position, generated per example from
    (seed, example index) for every position up to the last kept one: the draws depend neither
    on how examples are grouped into batches nor on which positions are kept.
    """
    valid = targets != IGNORE_INDEX
    width = int(positions.max()) + 1 if positions.numel() else 0
    uniforms = torch.stack(
        [
            torch.rand(width, generator=torch.Generator().manual_seed(seed + (i << 32)))
            for i in range(first_index, first_index + targets.shape[0])
        ]
    )[:, positions.cpu()][valid.cpu()]  # drawn on the CPU generator, on any device
    cdf = logits[valid].detach().float().softmax(dim=-1).cumsum(dim=-1)
    draws = torch.searchsorted(cdf, uniforms.to(logits.device).unsqueeze(-1))
    sampled = targets.clone()
    sampled[valid] = draws.squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return sampled


def fisher_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, nn.Parameter],
    num_samples: int,
    *,
    sampled_labels_seed: int | None = None,
    batched: bool = True,
    progress: bool = True,
) -> FisherScores:
    """Fisher information of every tensor in `params` over the first `num_samples` examples.

    `batches` are training micro-batches (input_ids, labels, ...), as the trainer collates them.
    Rows without label tokens are skipped. The model runs in eval mode (no dropout) and every
    random generator is left as it was; with transformers' gradient checkpointing on, its decoder
    layers recompute their forward in backward here too (`layer_checkpointing`). With
    `sampled_labels_seed`, labels are drawn from the model (sampled Fisher). `batched=False`
    sends every tensor down the one-example-at-a-time path: the reference the batched path is
    tested against.
    Under torch.distributed each rank reads its share of `num_samples` from its own batches and
    the scores are summed over ranks, so every rank ends with the same scores. Parameters FSDP2
    has sharded are scored by the batched rules only (a tensor left to the one-example path is
    refused), every rank running as many forwards and backwards as the busiest one.
    """
    start = time.perf_counter()
    taps = RuleTaps(model, params if batched else {})
    rowwise = {key: p for key, p in params.items() if key not in taps.covered}
    # Under FSDP2 every forward and backward gathers parameters from all ranks: the ranks run
    # the same number of them, in lockstep.
    lockstep = any(is_sharded(p) for p in params.values())
    _check_whole(rowwise, lockstep)
    scores = {
        key: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for key, p in params.items()
    }
    device = next(iter(params.values())).device
    wanted = share_of(num_samples)
    seen = 0
    bad_batch: tuple[int, int] | None = None
    filler: dict[str, torch.Tensor] | None = None
    scratch: dict[str, torch.Tensor] = {}  # a follower's scores, dropped
    was_training = model.training
    _eval_mode(model)
    bar = tqdm(total=wanted, unit="example", desc="Fisher pass", disable=not progress)
    try:
        with preserved_rng_state(), _checkpointed_if_enabled(model):
            stream = _labelled(batches, device, wanted)
            while True:
                batch = next(stream, None) if bad_batch is None else None
                more = batch is not None
                if not (any_rank(more, device) if lockstep else more):
                    break
                if batch is None:  # another rank still reads: the same collectives, no scores
                    scratch = scratch or {key: torch.zeros_like(t) for key, t in scores.items()}
                    _follow(taps, model, filler, scratch)
                    continue
                rows = batch["input_ids"].shape[0]
                if taps.rules:
                    forward = partial(_example_losses, model, batch, seen, sampled_labels_seed)
                    rowwise |= taps.accumulate(forward, scores)
                    _check_whole(rowwise, lockstep)
                if rowwise:
                    _accumulate_rowwise(model, batch, seen, sampled_labels_seed, rowwise, scores)
                seen += rows
                filler = batch
                bar.update(rows)
                if not _all_finite(scores):
                    bad_batch = (seen - rows, seen - 1)  # every rank learns of it after the sum
    finally:
        bar.close()
        taps.remove()
        model.train(was_training)
    if seen < wanted and bad_batch is None:
        LOG.warning(f"Fisher pass: the data ran out after {seen} of {wanted} examples; used all.")
    seen = sum_over_ranks(scores, seen)
    _check_finite(scores, bad_batch)
    if seen == 0:
        raise ValueError("The Fisher pass saw no example with label tokens.")
    for score in scores.values():
        score.div_(seen)
    return FisherScores(scores=scores, num_examples=seen, seconds=time.perf_counter() - start)


def _eval_mode(model: nn.Module) -> None:
    """Eval mode (no dropout), except bitsandbytes' 4-bit linears (QLoRA's base layers): on a
    CPU with AVX512-BF16 their eval forward of an input without gradient (the first layer's)
    repacks the weight in place for an inference kernel, rounding its scales to bf16 - the pass
    would change the base the run trains and the DoRA norms it reads. They have no dropout."""
    model.eval()
    bnb = sys.modules.get("bitsandbytes.nn")  # not imported: the model has none of its layers
    for module in model.modules() if bnb is not None else ():
        if isinstance(module, bnb.Linear4bit):
            module.train()


def _labelled(
    batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device, wanted: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches on `device`, cut to their rows with label tokens, until `wanted` rows
    were handed out (no batch is read past them)."""
    seen = 0
    for raw_batch in batches:
        batch = {k: v.to(device) for k, v in raw_batch.items()}
        batch = _first_rows_with_labels(batch, wanted - seen)
        rows = batch["input_ids"].shape[0]
        if rows:
            seen += rows
            yield batch
        if seen >= wanted:
            return


def _follow(
    taps: RuleTaps,
    model: nn.Module,
    batch: Mapping[str, torch.Tensor] | None,
    scratch: dict[str, torch.Tensor],
) -> None:
    """A rank that has read its share while others still read: run the same forward and
    backward (FSDP2's gathers) on a batch it already scored, adding to `scratch`."""
    if batch is None:
        rank, _ = rank_and_world()
        raise ValueError(
            f"Fisher pass: rank {rank} has no training example with label tokens while other "
            f"ranks do; every rank needs at least one."
        )
    _check_whole(taps.accumulate(partial(_example_losses, model, batch, 0, None), scratch), True)


def _check_whole(rowwise: Mapping[str, nn.Parameter], sharded: bool) -> None:
    """The generic path differentiates the parameters themselves: FSDP2's sharded ones get no
    per-example gradient."""
    if sharded and rowwise:
        key = next(iter(rowwise))
        raise ValueError(
            f"Fisher pass: tensor {key!r} ({len(rowwise)} in all) is scored one example at a "
            f"time, which needs it whole on one device, and FSDP2 has sharded it. Score before "
            f"sharding (fish_mask.score_after_sharding: false) or leave it out "
            f"(fish_mask.exclude)."
        )


def _all_finite(scores: Mapping[str, torch.Tensor]) -> bool:
    """Scores are sums of squares: a tensor's sum is finite iff all its entries are, unless the
    sum overflows - only then is every entry looked at."""
    if bool(torch.stack([score.sum() for score in scores.values()]).isfinite().all()):
        return True
    return all(bool(score.isfinite().all()) for score in scores.values())


def _check_finite(scores: Mapping[str, torch.Tensor], bad_batch: tuple[int, int] | None) -> None:
    """Stop on NaN/Inf (an fp16 overflow, a broken example): skipping them would silently
    change the estimate, keeping them would decide the ranking. Names the tensor and, on the
    rank that read them, the micro-batch's examples."""
    if _all_finite(scores):
        return
    key = next(key for key, score in scores.items() if not score.isfinite().all())
    rank, _ = rank_and_world()
    where = (
        f"examples {bad_batch[0]}-{bad_batch[1]} of the pass on rank {rank} (one micro-batch, "
        f"counted from 0 in data-loader order)"
        if bad_batch
        else "examples read by another rank (see its error)"
    )
    raise FloatingPointError(
        f"Fisher pass: non-finite gradient for adapter tensor {key!r} from {where}. Check those "
        f"examples and the training precision; no mask was made."
    )


@contextmanager
def _checkpointed_if_enabled(model: nn.Module) -> Iterator[None]:
    if not checkpointing_enabled(model):
        yield
        return
    with checkpointed_layers(model) as layers:
        if layers:
            LOG.info(f"Fisher pass: gradient checkpointing on, {layers} decoder layers recompute")
        yield


def _example_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor], first_index: int, seed: int | None
) -> torch.Tensor:
    """Forward a batch; each row's own loss, on the data's labels or (with a seed) sampled ones.
    Logits are formed only at positions that predict a label token of some row, where the
    model allows it (`logits_to_keep`): the output head's forward and backward shrink to those
    positions, and its gradient is zero everywhere else anyway."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    kept = (targets != IGNORE_INDEX).any(dim=0)
    # A head product of 1-2 rows takes a less accurate path on CPU (measured: 1e-3 relative
    # error in late LoRA layers' gradients against fp64, 5e-6 from 4 rows on): pad with
    # positions no row has a label at.
    kept[(~kept).nonzero()[: max(0, MIN_LOGIT_POSITIONS - int(kept.sum()))]] = True
    positions = kept.nonzero().squeeze(1)
    keep = {"logits_to_keep": positions} if _keeps_logits(model) else {}
    logits = model(**inputs, use_cache=False, **keep).logits
    if logits.shape[1] != positions.numel():  # every position's logits came back
        logits = logits[:, :-1][:, positions]
    targets = targets[:, positions]
    if seed is not None:
        targets = sampled_targets(logits, targets, positions, first_index, seed)
    return label_losses(logits, targets)[0]


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes `logits_to_keep` (causal LMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _first_rows_with_labels(batch: dict[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    """The batch restricted to its first `limit` rows that carry at least one label token."""
    has_labels = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)
    keep = has_labels.nonzero()[:limit, 0]
    if keep.numel() == has_labels.numel():
        return batch
    return {k: v[keep] for k, v in batch.items()}


def _accumulate_rowwise(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    first_index: int,
    seed: int | None,
    params: Mapping[str, nn.Parameter],
    scores: dict[str, torch.Tensor],
) -> None:
    """Generic path: one forward and backward per example, gradients squared and summed."""
    keys = list(params)
    tensors = [params[key] for key in keys]
    for n in range(batch["input_ids"].shape[0]):
        row = {k: v[n : n + 1] for k, v in batch.items()}
        loss = _example_losses(model, row, first_index + n, seed)
        grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
        for key, grad in zip(keys, grads, strict=True):
            if grad is not None:
                scores[key].add_(grad.float().square())
