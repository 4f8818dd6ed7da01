"""Diagonal empirical Fisher information of adapter entries.

F_i = mean over examples n of (d loss_n / d theta_i)^2, where loss_n is example n's own mean
next-token loss over its label tokens (what a batch-size-1 run minimises). Squares are taken per
example, never of a batch gradient, and accumulated in fp32.

Two paths compute the same numbers:
- Batched path (one forward and one backward per micro-batch): LoRA `nn.Linear` factors
  (lora_A / lora_B of plain LoRA layers, Conv1D-based models included: their factors are
  `nn.Linear`), lora_embedding_A / lora_embedding_B of plain LoRA embedding layers, and the
  down- and up-projections (weights and biases) of bottleneck adapters. A linear
  factor's per-example weight gradient is sum_t g_t x_t^T, formed from its recorded inputs x and
  output gradients g; embedding factors are formed from the token ids and the layer's output
  gradient.
- Generic path: every other trainable tensor (DoRA magnitudes and DoRA-coupled factors,
  modules_to_save copies, biases outside LoRA factors, a full model's own weights in
  full-parameter mode): one forward and backward per example, gradients of that example only.

`empirical` Fisher uses the data's labels (the paper); `sampled` Fisher replaces each label token
by a draw from the model's own predictive distribution (the true Fisher). A draw depends only on
(seed, example index, position), so both paths draw the same labels.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from axolotl_fish.bottleneck import BottleneckAdapter
from axolotl_fish.distributed import rank_and_world, share_of, sum_over_ranks
from axolotl_fish.rng import preserved_rng_state

LOG = logging.getLogger(__name__)
IGNORE_INDEX = -100
# Largest per-example gradient block (elements) materialised at once on the batched path.
_BLOCK_ELEMENTS = 1 << 25


@dataclass
class FisherScores:
    """Per-entry Fisher information (fp32, mean over examples) and how it was obtained."""

    scores: dict[str, torch.Tensor]
    num_examples: int
    seconds: float


def per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean next-token cross-entropy over its label tokens, and whether it has any.

    Only label positions are upcast to fp32, so memory scales with label tokens, not the full
    batch x sequence x vocabulary logits.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    rows = valid.nonzero()[:, 0]
    token_loss = F.cross_entropy(logits[:, :-1][valid].float(), targets[valid], reduction="none")
    counts = valid.sum(dim=1)
    sums = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, token_loss)
    return sums / counts.clamp(min=1), counts > 0


def sample_labels(
    logits: torch.Tensor, labels: torch.Tensor, first_index: int, seed: int
) -> torch.Tensor:
    """Labels with every label token replaced by a draw from softmax(logits) at its position.

    Inverse-CDF sampling with one uniform per position, generated per example from
    (seed, example index): independent of how examples are grouped into batches.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    uniforms = torch.stack(
        [
            torch.rand(targets.shape[1], generator=torch.Generator().manual_seed(seed + (i << 32)))
            for i in range(first_index, first_index + labels.shape[0])
        ]
    ).to(logits.device)
    cdf = logits[:, :-1][valid].detach().float().softmax(dim=-1).cumsum(dim=-1)
    draws = torch.searchsorted(cdf, uniforms[valid].unsqueeze(-1)).squeeze(-1)
    sampled = labels.clone()
    sampled[:, 1:][valid] = draws.clamp(max=logits.shape[-1] - 1)
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
    random generator is left as it was. With `sampled_labels_seed`, labels are drawn from the
    model (sampled Fisher). `batched=False` sends every tensor down the one-example-at-a-time
    path: the reference the batched path is tested against.
    Under torch.distributed each rank reads its share of `num_samples` from its own batches and
    the scores are summed over ranks, so every rank ends with the same scores.
    """
    start = time.perf_counter()
    taps = _FactorTaps(model, params if batched else {})
    rowwise = {key: p for key, p in params.items() if key not in taps.covered}
    scores = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}
    device = next(iter(params.values())).device
    wanted = share_of(num_samples)
    seen = 0
    bad_batch: tuple[int, int] | None = None
    was_training = model.training
    model.eval()
    bar = tqdm(total=wanted, unit="example", desc="Fisher pass", disable=not progress)
    try:
        with preserved_rng_state():
            for raw_batch in batches:
                batch = {k: v.to(device) for k, v in raw_batch.items()}
                batch = _first_rows_with_labels(batch, wanted - seen)
                rows = batch["input_ids"].shape[0]
                if rows == 0:
                    continue
                if taps.covered:
                    forward = partial(_example_losses, model, batch, seen, sampled_labels_seed)
                    taps.accumulate(forward, scores)
                if rowwise:
                    _accumulate_rowwise(model, batch, seen, sampled_labels_seed, rowwise, scores)
                seen += rows
                bar.update(rows)
                if not _all_finite(scores):
                    bad_batch = (seen - rows, seen - 1)  # every rank learns of it after the sum
                    break
                if seen >= wanted:
                    break
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


def _all_finite(scores: Mapping[str, torch.Tensor]) -> bool:
    return bool(torch.stack([score.isfinite().all() for score in scores.values()]).all())


def _check_finite(scores: Mapping[str, torch.Tensor], bad_batch: tuple[int, int] | None) -> None:
    """Stop on NaN/Inf (an fp16 overflow, a broken example): skipping them would silently
    change the estimate, keeping them would decide the ranking. Names the tensor and, on the
    rank that read them, the micro-batch's examples."""
    key = next((key for key, score in scores.items() if not score.isfinite().all()), None)
    if key is None:
        return
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


def _example_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor], first_index: int, seed: int | None
) -> torch.Tensor:
    """Forward a batch; each row's own loss, on the data's labels or (with a seed) sampled ones."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    if seed is not None:
        labels = sample_labels(logits, labels, first_index, seed)
    return per_example_loss(logits, labels)[0]


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


class _LinearFactor:
    """A plain-LoRA `nn.Linear` factor: per-example weight gradient sum_t g_t x_t^T."""

    def __init__(self, weight_key: str, bias_key: str | None) -> None:
        self.keys = (weight_key,) if bias_key is None else (weight_key, bias_key)

    def add(self, calls: list[tuple[torch.Tensor, torch.Tensor]], scores: dict) -> None:
        rows = calls[0][0].shape[0]
        x = torch.cat([x.reshape(rows, -1, x.shape[-1]) for x, _ in calls], dim=1).float()
        g = torch.cat([g.reshape(rows, -1, g.shape[-1]) for _, g in calls], dim=1).float()
        scores[self.keys[0]].add_(_sum_of_squared_outer(g, x))
        if len(self.keys) == 2:
            scores[self.keys[1]].add_(g.sum(dim=1).square().sum(dim=0))


class _EmbeddingFactors:
    """lora_embedding_A (r x V) and lora_embedding_B (out x r) of a plain-LoRA Embedding layer,
    from the layer's token ids and output gradient g: with c = scaling * embed_scale,
    dB = c * sum_t g_t a_t^T (a_t = A[:, id_t]) and dA[:, v] = c * sum_{t: id_t = v} B^T g_t."""

    def __init__(self, layer: nn.Module, adapter: str, a_key: str, b_key: str) -> None:
        self.layer, self.adapter = layer, adapter
        self.keys = (a_key, b_key)

    def add(self, calls: list[tuple[torch.Tensor, torch.Tensor]], scores: dict) -> None:
        layer, adapter = self.layer, self.adapter
        a = layer.lora_embedding_A[adapter].detach().float()
        b = layer.lora_embedding_B[adapter].detach().float()
        scale = layer.scaling[adapter]
        embed_scale = layer._get_embed_scale()
        if embed_scale is not None:
            scale = scale * embed_scale.float()
        rows = calls[0][0].shape[0]
        ids = torch.cat([ids.reshape(rows, -1) for ids, _ in calls], dim=1)
        g = torch.cat([g.reshape(rows, -1, g.shape[-1]) for _, g in calls], dim=1).float() * scale
        scores[self.keys[1]].add_(_sum_of_squared_outer(g, F.embedding(ids, a.T)))
        grad_after_a = g @ b  # (N, T, r)
        padding_idx = layer.get_base_layer().padding_idx
        if padding_idx is not None:  # F.embedding gives the padding row no gradient
            grad_after_a = grad_after_a.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
        vocab, rank = a.shape[1], a.shape[0]
        block = max(1, _BLOCK_ELEMENTS // (vocab * rank))
        total = torch.zeros(vocab, rank, device=g.device)
        for start in range(0, rows, block):
            chunk = grad_after_a[start : start + block]
            index = ids[start : start + block].unsqueeze(-1).expand_as(chunk)
            per_example = torch.zeros(chunk.shape[0], vocab, rank, device=g.device)
            total.add_(per_example.scatter_add_(1, index, chunk).square().sum(dim=0))
        scores[self.keys[0]].add_(total.T)


class _FactorTaps:
    """Forward hooks that record each call's input and output for the batched path.

    A tensor qualifies only when it is used solely through the recorded forward: LoRA layers
    with a variant (DoRA reuses lora_B @ lora_A to normalise the weight) and embedding layers
    with special lookups are left to the generic path, as is anything else.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        key_of = {id(p): key for key, p in params.items()}
        self.rules: dict[nn.Module, _LinearFactor | _EmbeddingFactors] = {}
        for module, rule in itertools.chain(
            _batched_rules(model, key_of), _bottleneck_rules(model, key_of)
        ):
            self.rules[module] = rule
        self.covered = {key for rule in self.rules.values() for key in rule.keys}
        self._calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._recording = False
        self._handles = [m.register_forward_hook(self._record) for m in self.rules]

    def _record(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if self._recording:
            self._calls[module].append((args[0].detach(), output))

    def accumulate(
        self, forward: Callable[[], torch.Tensor], scores: dict[str, torch.Tensor]
    ) -> None:
        """Run `forward` (returning per-row losses) recording the calls, backpropagate once,
        and add every row's squared gradients to `scores`."""
        self._recording = True
        try:
            loss = forward()
            calls = [(m, x, out) for m, pairs in self._calls.items() for x, out in pairs]
            # Gradients w.r.t. the recorded outputs only: backward skips every weight gradient.
            grads = torch.autograd.grad(loss.sum(), [out for _, _, out in calls], allow_unused=True)
        finally:
            self._recording = False
            self._calls.clear()
        per_module: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for (module, x, _), grad in zip(calls, grads, strict=True):
            if grad is not None:
                per_module[module].append((x, grad))
        # A module called several times in one forward: its per-example gradient is the sum.
        for module, pairs in per_module.items():
            self.rules[module].add(pairs, scores)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _sum_of_squared_outer(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_n (g_n^T x_n)^2 for g: (N, T, O), x: (N, T, I), in blocks of bounded memory."""
    rows, _, out_features = g.shape
    block = max(1, _BLOCK_ELEMENTS // (out_features * x.shape[-1]))
    total = torch.zeros(out_features, x.shape[-1], device=x.device)
    for start in range(0, rows, block):
        per_example = torch.bmm(g[start : start + block].transpose(1, 2), x[start : start + block])
        total.add_(per_example.square().sum(dim=0))
    return total


def _batched_rules(
    model: nn.Module, key_of: Mapping[int, str]
) -> Iterator[tuple[nn.Module, _LinearFactor | _EmbeddingFactors]]:
    """(module to hook, rule) for every adapter tensor the batched path computes exactly."""
    from peft.tuners.lora import Embedding, LoraLayer

    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        plain = [a for a in layer.lora_A if a not in layer.lora_variant]
        for adapter in plain:
            for factor in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if isinstance(factor, nn.Linear) and id(factor.weight) in key_of:
                    bias = factor.bias
                    yield factor, _LinearFactor(key_of[id(factor.weight)], key_of.get(id(bias)))
        if isinstance(layer, Embedding) and _plain_lookup(layer):
            for adapter, a in layer.lora_embedding_A.items():
                b = layer.lora_embedding_B[adapter]
                if adapter not in layer.lora_variant and id(a) in key_of and id(b) in key_of:
                    yield layer, _EmbeddingFactors(layer, adapter, key_of[id(a)], key_of[id(b)])


def _bottleneck_rules(
    model: nn.Module, key_of: Mapping[int, str]
) -> Iterator[tuple[nn.Module, _LinearFactor]]:
    """(projection, rule) for the down- and up-projection of every bottleneck adapter: plain
    `nn.Linear` layers used only through their forward, so `_LinearFactor` is exact for their
    weights and biases."""
    for adapter in model.modules():
        if isinstance(adapter, BottleneckAdapter):
            for linear in (adapter.down, adapter.up):
                if id(linear.weight) in key_of:
                    yield (
                        linear,
                        _LinearFactor(key_of[id(linear.weight)], key_of.get(id(linear.bias))),
                    )


def _plain_lookup(layer: nn.Module) -> bool:
    """An embedding whose LoRA lookup is a plain F.embedding (no max_norm, no frequency scaling,
    no tensor-parallel input/output functions) and that holds one embedding adapter."""
    base = layer.get_base_layer()
    return (
        base.max_norm is None
        and not base.scale_grad_by_freq
        and not getattr(layer, "input_fns", {})
        and not getattr(layer, "output_fns", {})
        and len(layer.lora_embedding_A) == 1
    )
