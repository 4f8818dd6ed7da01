"""How the batched Fisher pass forms per-example squared gradients: one rule class per layer kind.

A rule claims candidate tensors of the modules it understands (`claim`), and adds every example's
squared gradient of them to the scores (`add`) from what was recorded on those modules during one
batched forward and backward: each call's input, output and output gradient. The backward then
needs no weight gradient at all. Tensors no rule claims take the generic one-example-at-a-time
path (`fisher.py`).

A rule may only claim a tensor that is used solely through the forward of the module(s) it
records. So modules whose class overrides the forward of `nn.Linear` / `nn.Embedding` are left
alone, as are tensors held by more than one module (except a tied embedding, which has its own
rule) and the factors and base layers of LoRA layers with a variant other than DoRA on a linear
layer. DoRA's linear layers reuse `lora_B @ lora_A` and the base weight only in the weight norm,
which PEFT detaches from the gradient (the DoRA paper's section 4.3): their factors train
through their own forward alone, and the magnitude vector has its own rule. QLoRA is no special
case: PEFT's LoRA layers over bitsandbytes 4-bit and 8-bit linears hold their factors as plain
`nn.Linear` modules, which `LinearRule` claims as for `lora.Linear`, and `DoraMagnitudeRule`
reads their base weight dequantised; the quantized base layers are frozen, never candidates.

Rules live in `RULES`, tried in order for every module; `register_rule` adds one (e.g. for a new
adapter type). A rule whose recorded calls turn out not to be per-example (a first dimension
other than the batch's rows, e.g. GPT-2's position embedding, looked up once for all rows) is
dropped after the first micro-batch and its tensors go to the generic path.

Every rule also scores parameters FSDP2 has sharded (each rank holds a slice): the recorded inputs
and output gradients are whole on every rank, and a rule that reads parameter values
(`FisherRule.reads_values`) reads them during backward, while FSDP2 holds the layer gathered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from axolotl_fish.base.sharded import full_tensor

# Largest per-example gradient block (elements) materialised at once.
BLOCK_ELEMENTS = 1 << 25
# Most gradient-carrying tokens per example for which the token-pair product is used (on CPU it
# was 5-9x faster than per-example products at 1-2 tokens and even at about 6-8; a head trained
# on short answers has 1-3 such tokens per example).
PAIR_MAX_TOKENS = 6
# Per-example products of at least this many entries are squared into the sum one example at a
# time (memory traffic, not kernel launches, is their cost); smaller ones a block at a time.
SQUARE_IN_PLACE_ELEMENTS = 1 << 20


class Call(NamedTuple):
    """One forward call of a recorded module: its first input, its output (None unless a rule of
    the module `needs_output`), the output's gradient."""

    input: torch.Tensor
    output: torch.Tensor | None
    grad: torch.Tensor


@dataclass
class Candidates:
    """The candidate tensors of a model, which module(s) hold each, and which are claimed."""

    key_of: dict[int, str]  # id(parameter) -> saved key
    owners: dict[int, list[nn.Module]]  # id(parameter) -> the modules holding it directly
    excluded: set[nn.Module]  # modules whose tensors are used outside their own forward
    claimed: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, model: nn.Module, params: Mapping[str, nn.Parameter]) -> Candidates:
        owners: dict[int, list[nn.Module]] = defaultdict(list)
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    owners[id(param)].append(module)
        key_of = {id(param): key for key, param in params.items()}
        return cls(key_of=key_of, owners=owners, excluded=_lora_variant_modules(model))

    def key(self, param: torch.Tensor | None) -> str | None:
        """The saved key of `param` if it is a candidate no rule has claimed yet."""
        key = None if param is None else self.key_of.get(id(param))
        return None if key is None or key in self.claimed else key

    def own_key(self, module: nn.Module, name: str) -> str | None:
        """The key of `module.<name>` if it is an unclaimed candidate held by this module only."""
        param = module._parameters.get(name)
        if module in self.excluded or param is None or self.owners[id(param)] != [module]:
            return None
        return self.key(param)


class FisherRule(ABC):
    """Adds per-example squared gradients of the tensors `keys` from calls of `modules`."""

    keys: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    # Fewest dimensions of a per-example input: (rows, tokens, ...) for layers over hidden states.
    input_ndim = 3
    # Whether `add` reads the calls' outputs; if no rule of a module does, they are not kept.
    needs_output = False
    # Whether `add` reads parameter values of its modules (not only shapes and dtypes): whole only
    # while FSDP2 holds them gathered, during the backward that hands the rule its calls.
    reads_values = False

    @classmethod
    @abstractmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> FisherRule | None:
        """A rule for candidate tensors of `module`, or None if this class does not apply."""

    @abstractmethod
    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        """Add sum over the batch's examples of each claimed tensor's squared gradient."""

    def per_example(self, calls: Mapping[nn.Module, list[Call]], rows: int) -> bool:
        """Whether every call holds one slice per example (first dimension = the batch's rows)."""
        return all(_per_example(c, rows, self.input_ndim) for c in calls.values())

    def values_read(self) -> Iterator[torch.Tensor]:
        """The parameters whose values `add` needs whole (with `reads_values`), as FSDP2 holds
        them during the layer's backward; a rule that gathers some itself leaves them out."""
        return (p for module in self.modules for p in module.parameters())


def _per_example(calls: list[Call], rows: int, ndim: int) -> bool:
    return all(
        call.input.dim() >= ndim and call.input.shape[0] == rows and call.grad.shape[0] == rows
        for call in calls
    )


RULES: list[type[FisherRule]] = []


def register_rule(rule: type[FisherRule]) -> type[FisherRule]:
    """Add a rule class to the registry (a class decorator); earlier rules are tried first."""
    RULES.append(rule)
    return rule


def claim_rules(model: nn.Module, params: Mapping[str, nn.Parameter]) -> list[FisherRule]:
    """Every rule that claims candidate tensors of `model`; each tensor is claimed at most once."""
    candidates = Candidates.of(model, params)
    rules = []
    for module in model.modules():
        for rule_class in RULES:
            rule = rule_class.claim(module, candidates)
            if rule is not None:
                candidates.claimed.update(rule.keys)
                rules.append(rule)
    return rules


def _cat(calls: list[Call], part: str, rows: int, trailing: bool = True) -> torch.Tensor:
    """The calls' `part` tensors as (rows, tokens[, features]), tokens of all calls concatenated
    (a module called several times in one forward: its per-example gradient is the sum)."""
    parts = [getattr(call, part) for call in calls]
    shaped = [t.reshape(rows, -1, t.shape[-1]) if trailing else t.reshape(rows, -1) for t in parts]
    joined = shaped[0] if len(shaped) == 1 else torch.cat(shaped, dim=1)  # one call: no copy
    return joined.float() if trailing else joined


def gradient_tokens(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g: (N, T, O), x: (N, T, I) cut to the tokens whose output gradient is not all zero,
    packed to the front of each row, where that leaves few of them (at most `PAIR_MAX_TOKENS`,
    or half the tokens): a head trained on answers only has gradient at its label positions
    alone. Rows with fewer such tokens are filled with zero-gradient tokens, which add nothing
    to any product below. A NaN gradient keeps its token (the pass reports it)."""
    live = g.abs().amax(dim=-1) != 0
    width = int(live.sum(dim=1).max()) if live.numel() else 0
    if width > PAIR_MAX_TOKENS and 2 * width > g.shape[1]:
        return g, x
    order = torch.argsort(live.logical_not().to(torch.int8), dim=1, stable=True)[:, :width]

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    return take(g), take(x)


def sum_of_squared_outer(
    g: torch.Tensor, x: torch.Tensor, product_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """sum_n (g_n^T x_n)^2 for output gradients g: (N, T, O) and inputs x: (N, T, I), in blocks
    of bounded memory, over the tokens that carry gradient. With at most `PAIR_MAX_TOKENS` of
    them per example it is one matrix product over token pairs; else one product per example,
    computed in `product_dtype` (see `product_dtype_of`) and squared and summed in fp32."""
    return _sum_of_squared_outer_over(*gradient_tokens(g, x), product_dtype)


def product_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer's per-example weight gradients are formed in: a half-precision weight's
    own, as autograd forms that layer's training gradient (each per-example gradient is rounded
    to bf16 as the training gradient is, and the products run on a GPU's bf16 matrix units, not
    its far slower fp32 ones), else fp32."""
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _sum_of_squared_outer_over(
    g: torch.Tensor, x: torch.Tensor, product_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`sum_of_squared_outer` of tensors already cut by `gradient_tokens`."""
    if g.shape[1] <= PAIR_MAX_TOKENS:
        return _token_pair_product(g, x)
    rows, _, out_features = g.shape
    block = max(1, BLOCK_ELEMENTS // (out_features * x.shape[-1]))
    total = torch.zeros(out_features, x.shape[-1], device=x.device)
    for start in range(0, rows, block):
        gb, xb = (t[start : start + block].to(product_dtype) for t in (g, x))
        per_example = torch.bmm(gb.transpose(1, 2), xb)
        if total.numel() >= SQUARE_IN_PLACE_ELEMENTS:
            for product in per_example:  # one pass over each: no fp32 copy, no squared copy
                total.addcmul_(product, product)
        else:
            total.add_(per_example.float().square_().sum(dim=0))
    return total


def _token_pair_product(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_n (sum_t g_nt x_nt^T)^2 = sum_n sum_{t,s} (g_nt * g_ns)(x_nt * x_ns)^T: one matrix
    product over the (N x T(T+1)/2) token pairs t <= s (off-diagonal pairs counted twice), with
    no per-example (O x I) tensor. Rounding can leave a true 0 slightly negative: clamped."""
    rows, width, out_features = g.shape
    first, second = torch.triu_indices(width, width, device=g.device)
    twice = torch.where(first == second, 1.0, 2.0).to(g.device).unsqueeze(-1)
    pairs = first.numel()
    block = max(1, BLOCK_ELEMENTS // max(1, pairs * (out_features + x.shape[-1])))
    total = torch.zeros(out_features, x.shape[-1], device=x.device)
    for start in range(0, rows, block):
        gb, xb = g[start : start + block], x[start : start + block]
        left = (gb[:, first] * gb[:, second] * twice).reshape(-1, out_features)
        total.addmm_(left.T, (xb[:, first] * xb[:, second]).reshape(-1, x.shape[-1]))
    return total.clamp_(min=0)


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """An instance of `base` whose forward is `base`'s own (not overridden by a subclass)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _embedding_plain(module: nn.Module) -> bool:
    """A lookup PyTorch differentiates as a plain scatter (no max_norm, no frequency scaling)."""
    return module.max_norm is None and not module.scale_grad_by_freq


@register_rule
class LinearRule(FisherRule):
    """Any `nn.Linear` (LoRA factors of plain LoRA layers, a model's own projections, the layers
    of other adapters) and GPT-2's `Conv1D` (weight stored transposed): per-example weight
    gradient sum_t g_t x_t^T, bias gradient sum_t g_t."""

    def __init__(self, module: nn.Module, weight: str | None, bias: str | None) -> None:
        self.modules = (module,)
        self.weight, self.bias = weight, bias
        self.keys = tuple(key for key in (weight, bias) if key is not None)
        self.transposed = not isinstance(module, nn.Linear)

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> LinearRule | None:
        from transformers.pytorch_utils import Conv1D

        if not (_plain(module, nn.Linear) or _plain(module, Conv1D)):
            return None
        weight, bias = candidates.own_key(module, "weight"), candidates.own_key(module, "bias")
        return None if weight is None and bias is None else cls(module, weight, bias)

    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        rows = module_calls[0].input.shape[0]
        g = _cat(module_calls, "grad", rows)
        if self.weight is not None:
            x = _cat(module_calls, "input", rows)
            outer = sum_of_squared_outer(g, x, product_dtype_of(self.modules[0].weight))
            scores[self.weight].add_(outer.T if self.transposed else outer)
        if self.bias is not None:
            scores[self.bias].add_(g.sum(dim=1).square().sum(dim=0))


def _row_sums(ids: torch.Tensor, g: torch.Tensor, vocab: int, padding_idx: int | None):
    """Per example, the gradient of every embedding row it looks up: (example, row) pairs and
    sum_{t: id_t = row} g_t, without a per-example (vocab x dim) tensor."""
    rows = ids.shape[0]
    pair = (torch.arange(rows, device=ids.device).unsqueeze(1) * vocab + ids).flatten()
    grads = g.reshape(-1, g.shape[-1])
    if padding_idx is not None:  # F.embedding gives the padding row no gradient
        keep = ids.flatten() != padding_idx
        pair, grads = pair[keep], grads[keep]
    unique, inverse = torch.unique(pair, return_inverse=True)
    sums = torch.zeros(unique.numel(), grads.shape[-1], device=g.device).index_add_(
        0, inverse, grads
    )
    return unique, sums


@register_rule
class TiedEmbeddingRule(FisherRule):
    """A weight shared by an `nn.Embedding` (input) and an `nn.Linear` (output head), as in
    SmolLM2 or GPT-2: one tensor, whose per-example gradient is the sum of both uses (formed
    before squaring), dense per example in blocks of bounded memory."""

    def __init__(self, embedding: nn.Embedding, head: nn.Linear, key: str) -> None:
        self.modules = (embedding, head)
        self.keys = (key,)

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> TiedEmbeddingRule | None:
        if not (_plain(module, nn.Embedding) and _embedding_plain(module)):
            return None
        weight = module.weight
        owners = candidates.owners[id(weight)]
        key = candidates.key(weight)
        heads = [m for m in owners if m is not module]
        if key is None or len(owners) != 2 or any(m in candidates.excluded for m in owners):
            return None
        head = heads[0]
        if not _plain(head, nn.Linear) or candidates.key(head.bias) is not None:
            return None  # a trainable head bias: leave the pair to the generic path
        return cls(module, head, key)

    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        """Per example n the gradient is H_n + E_n: the head's H_n = g_n^T x_n and the lookups'
        E_n, non-zero only on the rows n looked up. sum_n H_n^2 comes from the head alone; each
        looked-up (n, row) then adds (H + E)^2 - H^2 = E * (2H + E) for that row."""
        embedding, head = self.modules
        lookups, outputs = calls[embedding], calls[head]
        rows = (lookups or outputs)[0].input.shape[0]
        vocab = embedding.weight.shape[0]
        total = scores[self.keys[0]]
        if outputs:
            g, x = gradient_tokens(_cat(outputs, "grad", rows), _cat(outputs, "input", rows))
            total.add_(_sum_of_squared_outer_over(g, x, product_dtype_of(head.weight)))
        if not lookups:
            return
        ids = _cat(lookups, "input", rows, trailing=False)
        pairs, sums = _row_sums(ids, _cat(lookups, "grad", rows), vocab, embedding.padding_idx)
        example, row = pairs // vocab, pairs % vocab
        head_rows = torch.zeros_like(sums)
        if outputs:
            for n in range(rows):
                at = (example == n).nonzero().squeeze(1)
                head_rows[at] = g[n][:, row[at]].T @ x[n]
        total.index_add_(0, row, sums * (2 * head_rows + sums)).clamp_(min=0)

    def per_example(self, calls: Mapping[nn.Module, list[Call]], rows: int) -> bool:
        embedding, head = self.modules
        return _per_example(calls[embedding], rows, 2) and _per_example(calls[head], rows, 3)


@register_rule
class EmbeddingRule(FisherRule):
    """An `nn.Embedding` held by itself: per example, row v's gradient is sum_{t: id_t = v} g_t."""

    input_ndim = 2

    def __init__(self, module: nn.Embedding, key: str) -> None:
        self.modules = (module,)
        self.keys = (key,)

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> EmbeddingRule | None:
        if not (_plain(module, nn.Embedding) and _embedding_plain(module)):
            return None
        key = candidates.own_key(module, "weight")
        return None if key is None else cls(module, key)

    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        [module] = self.modules
        rows = module_calls[0].input.shape[0]
        vocab = module.weight.shape[0]
        ids = _cat(module_calls, "input", rows, trailing=False)
        pairs, sums = _row_sums(ids, _cat(module_calls, "grad", rows), vocab, module.padding_idx)
        scores[self.keys[0]].index_add_(0, pairs % vocab, sums.square())


@contextmanager
def _swapped(module: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace some of `module`'s parameters by plain tensors."""
    saved = {name: module._parameters[name] for name in values}
    module._parameters.update(values)
    try:
        yield
    finally:
        module._parameters.update(saved)


@register_rule
class NormRule(FisherRule):
    """A normalisation layer (`nn.LayerNorm`, any `...RMSNorm`) whose output is affine in its
    weight and bias per feature: y = c + w * f(x) (+ b * h(x)). f and h are read off the layer
    itself by calling it with w, b set to 0 and 1; then the per-example weight gradient is
    sum_t g_t * f_t. The reconstruction is checked against the recorded output."""

    needs_output = True
    reads_values = True

    def __init__(self, module: nn.Module, weight: str | None, bias: str | None) -> None:
        self.modules = (module,)
        self.weight, self.bias = weight, bias
        self.keys = tuple(key for key in (weight, bias) if key is not None)

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> NormRule | None:
        name = type(module).__name__
        if not (_plain(module, nn.LayerNorm) or name.endswith("RMSNorm")):
            return None
        params = module._parameters
        if set(params) - {"weight", "bias"} or params.get("weight") is None:
            return None
        if any(p is not None and p.dim() != 1 for p in params.values()):
            return None
        weight, bias = candidates.own_key(module, "weight"), candidates.own_key(module, "bias")
        return None if weight is None and bias is None else cls(module, weight, bias)

    @torch.no_grad()
    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        [module] = self.modules
        params = {name: p for name, p in module._parameters.items() if p is not None}
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        rows = module_calls[0].input.shape[0]
        g = _cat(module_calls, "grad", rows)
        x = [call.input for call in module_calls]

        def probe(name: str | None) -> torch.Tensor:
            values = zeros if name is None else zeros | {name: torch.ones_like(params[name])}
            with _swapped(module, values):
                return torch.cat([module(xi).reshape(rows, -1, g.shape[-1]) for xi in x], 1)

        base = probe(None).float()
        slopes = {name: probe(name).float() - base for name in params}
        rebuilt = base + sum(slopes[name] * params[name].float() for name in params)
        recorded = _cat(module_calls, "output", rows)
        if not torch.allclose(rebuilt, recorded, rtol=1e-2, atol=1e-3 * recorded.abs().max()):
            raise RuntimeError(
                f"Fisher pass: {type(module).__name__} is not affine in its weight/bias; its "
                f"tensors {self.keys} cannot take the batched path. Exclude them "
                f"(fish_mask.exclude) or report the layer type."
            )
        for name, key in (("weight", self.weight), ("bias", self.bias)):
            if key is not None:
                scores[key].add_((g * slopes[name]).sum(dim=1).square().sum(dim=0))


@register_rule
class LoraEmbeddingRule(FisherRule):
    """lora_embedding_A (r x V) and lora_embedding_B (out x r) of a plain-LoRA Embedding layer,
    from the layer's token ids and output gradient g: with c = scaling * embed_scale,
    dB = c * sum_t g_t a_t^T (a_t = A[:, id_t]) and dA[:, v] = c * sum_{t: id_t = v} B^T g_t."""

    input_ndim = 2
    reads_values = True

    def __init__(self, layer: nn.Module, adapter: str, a_key: str, b_key: str) -> None:
        self.modules = (layer,)
        self.adapter = adapter
        self.keys = (a_key, b_key)

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> LoraEmbeddingRule | None:
        from peft.tuners.lora import Embedding

        if not isinstance(module, Embedding) or not _plain_lora_lookup(module):
            return None
        [(adapter, a)] = module.lora_embedding_A.items()
        a_key, b_key = candidates.key(a), candidates.key(module.lora_embedding_B[adapter])
        if adapter in module.lora_variant or a_key is None or b_key is None:
            return None
        return cls(module, adapter, a_key, b_key)

    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        [layer] = self.modules
        rows = module_calls[0].input.shape[0]
        ids = _cat(module_calls, "input", rows, trailing=False)
        scale = layer.scaling[self.adapter] * _embed_scale(layer)
        g = _cat(module_calls, "grad", rows) * scale
        _add_lora_embedding_scores(layer, self.adapter, ids, g, self.keys, scores)


def _embed_scale(layer: nn.Module) -> torch.Tensor | float:
    """The factor some embeddings (Gemma's) apply in their forward, which PEFT applies to the
    adapter's output too; 1 for the others."""
    embed_scale = layer._get_embed_scale()
    return 1.0 if embed_scale is None else embed_scale.float()


def _add_lora_embedding_scores(
    layer: nn.Module,
    adapter: str,
    ids: torch.Tensor,
    g: torch.Tensor,
    keys: tuple[str, ...],
    scores: dict[str, torch.Tensor],
) -> None:
    """Squared per-example gradients of lora_embedding_A and _B (`keys`), from the ids and the
    gradient g (rows, tokens, out) reaching A[ids] B."""
    a = layer.lora_embedding_A[adapter].detach().float()
    b = layer.lora_embedding_B[adapter].detach().float()
    scores[keys[1]].add_(sum_of_squared_outer(g, F.embedding(ids, a.T)))
    pairs, sums = _row_sums(ids, g @ b, a.shape[1], layer.get_base_layer().padding_idx)
    grad_a = torch.zeros_like(a.T).index_add_(0, pairs % a.shape[1], sums.square())
    scores[keys[0]].add_(grad_a.T)


@register_rule
class DoraEmbeddingRule(FisherRule):
    """DoRA on a LoRA Embedding layer. PEFT's output is y = (m / n) * (base + c s A[id] B) (c
    the embed scale, n the detached norm of W + s (B A)^T per output feature), so the factors
    get `LoraEmbeddingRule`'s gradients with g * c s m / n reaching A[id] B, and m the
    per-example gradient sum_t g_t * (base_t + c s A[id_t] B) / n. Axolotl makes the magnitude
    an FSDP2 group of its own, not gathered during this layer's backward: m is gathered here, a
    collective every rank reaches at the same point (their backwards run in lockstep). Values do
    not change during a pass: m and n are formed at its first micro-batch only."""

    input_ndim = 2
    reads_values = True

    def __init__(self, layer: nn.Module, adapter: str, keys: tuple[str, str, str]) -> None:
        self.modules = (layer,)
        self.adapter = adapter
        self.magnitude = layer.lora_magnitude_vector[adapter]
        self.keys = keys
        self._m_and_n: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> DoraEmbeddingRule | None:
        from peft.tuners.lora import Embedding
        from peft.tuners.lora.variants import DoraEmbeddingVariant

        if not isinstance(module, Embedding) or not _plain_lora_lookup(module):
            return None
        [(adapter, a)] = module.lora_embedding_A.items()
        if not isinstance(module.lora_variant.get(adapter), DoraEmbeddingVariant):
            return None
        magnitude = module.lora_magnitude_vector[adapter]
        tensors = (a, module.lora_embedding_B[adapter], magnitude.weight)
        keys = tuple(candidates.key(tensor) for tensor in tensors)
        if None in keys or set(magnitude._parameters) != {"weight"}:
            return None
        return cls(module, adapter, keys)

    def values_read(self) -> Iterator[torch.Tensor]:
        gathered_here = {id(p) for p in self.magnitude.parameters()}
        return (p for p in self.modules[0].parameters() if id(p) not in gathered_here)

    @torch.no_grad()
    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        [layer] = self.modules
        a = layer.lora_embedding_A[self.adapter].detach().float()
        b = layer.lora_embedding_B[self.adapter].detach().float()
        scale = layer.scaling[self.adapter] * _embed_scale(layer)
        base = layer.get_base_layer()
        if self._m_and_n is None:
            m = full_tensor(self.magnitude.weight).float()
            n = self.magnitude.get_weight_norm(
                base.weight.float(), b @ a, layer.scaling[self.adapter]
            )
            self._m_and_n = (m, n)
        m, norm = self._m_and_n
        rows = module_calls[0].input.shape[0]
        ids = _cat(module_calls, "input", rows, trailing=False)
        g = _cat(module_calls, "grad", rows)
        _add_lora_embedding_scores(
            layer, self.adapter, ids, g * (scale * m / norm), self.keys, scores
        )
        slope = (base(ids).float() + scale * (F.embedding(ids, a.T) @ b.T)) / norm
        scores[self.keys[2]].add_((g * slope).sum(dim=1).square().sum(dim=0))


def _plain_lora_lookup(layer: nn.Module) -> bool:
    """A LoRA embedding whose lookup is a plain F.embedding (no max_norm, no frequency scaling,
    no tensor-parallel input/output functions) and that holds one embedding adapter."""
    return (
        _embedding_plain(layer.get_base_layer())
        and not getattr(layer, "input_fns", {})
        and not getattr(layer, "output_fns", {})
        and len(layer.lora_embedding_A) == 1
    )


def _lora_variant_modules(model: nn.Module) -> set[nn.Module]:
    """Base layers of LoRA layers with a variant, and their factors unless the variant is DoRA on
    a linear layer (whose factors are used, with gradient, only through their forward)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return set()
    excluded: set[nn.Module] = set()
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and layer.lora_variant:
            excluded.add(layer.get_base_layer())
            for adapter in [a for a in layer.lora_variant if _dora_linear(layer, a) is None]:
                excluded.update(
                    factors[adapter]
                    for factors in (layer.lora_A, layer.lora_B)
                    if adapter in factors
                )
    return excluded


def _dora_linear(layer: nn.Module, adapter: str) -> nn.Module | None:
    """The magnitude module of `adapter` if it is DoRA on a linear LoRA layer, else None (also
    when FSDP2 wrapped it on its own, as Axolotl does: its class is then a subclass)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    if not isinstance(layer.lora_variant.get(adapter), DoraLinearVariant):
        return None
    magnitude = layer.lora_magnitude_vector[adapter]
    return magnitude if _plain(magnitude, DoraLinearLayer) else None


@register_rule
class DoraMagnitudeRule(FisherRule):
    """The magnitude vector m of DoRA on a linear layer. PEFT adds r = (m / n - 1) * base +
    (m / n) * s * B(A(x)) to the base output (base = x W^T, no bias), the weight norm n
    detached: r is linear in m, and r(m = 0) = -base, so d r_t / d m = (r_t + base_t) / m from
    the recorded r_t and the base weight alone, and the per-example gradient is sum_t g_t * that
    slope. Where some m is 0 the slope is (base_t + s B A x_t) / n instead, from the LoRA
    factors' values: FSDP2 may have sharded those on their own (Axolotl does), so they are
    gathered, a collective every rank reaches at the same point (they hold the same m and run
    their backwards in lockstep), once per pass with n."""

    needs_output = True
    reads_values = True

    def __init__(self, layer: nn.Module, magnitude: nn.Module, adapter: str, key: str) -> None:
        self.modules = (magnitude,)
        self.layer, self.adapter = layer, adapter
        self.keys = (key,)
        self._factors_and_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def claim(cls, module: nn.Module, candidates: Candidates) -> DoraMagnitudeRule | None:
        from peft.tuners.lora import LoraLayer

        if not isinstance(module, LoraLayer) or len(module.lora_variant) != 1:
            return None
        [adapter] = module.lora_variant
        magnitude = _dora_linear(module, adapter)
        if magnitude is None or set(magnitude._parameters) != {"weight"}:
            return None
        key = candidates.key(magnitude.weight)
        owners = candidates.owners.get(id(magnitude.weight), [])
        if key is None or owners != [magnitude]:
            return None
        return cls(module, magnitude, adapter, key)

    @torch.no_grad()
    def add(self, calls: Mapping[nn.Module, list[Call]], scores: dict[str, torch.Tensor]) -> None:
        [module_calls] = calls.values()
        weight = self.modules[0].weight
        rows = module_calls[0].input.shape[0]
        g = _cat(module_calls, "grad", rows)
        base = torch.cat(
            [self._base(call.input).reshape(rows, -1, g.shape[-1]) for call in module_calls], 1
        )
        if bool((weight == 0).any()):
            slope = self._slope_from_factors(_cat(module_calls, "input", rows).float(), base)
        else:
            slope = (_cat(module_calls, "output", rows) + base) / weight.float()
        scores[self.keys[0]].add_((g * slope).sum(dim=1).square().sum(dim=0))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output without bias, as PEFT's DoRA forms it."""
        from peft.utils.other import transpose

        weight = self._base_weight().to(x.dtype)
        return F.linear(x, transpose(weight, self.modules[0].fan_in_fan_out)).float()

    def _base_weight(self) -> torch.Tensor:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(self.layer.get_base_layer())

    def _slope_from_factors(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """d r_t / d m = (base_t + s B A x_t) / n, with n as PEFT computes it."""
        layer, adapter = self.layer, self.adapter
        scaling = layer.scaling[adapter]
        if self._factors_and_norm is None:
            a, b = (full_tensor(f[adapter].weight).float() for f in (layer.lora_A, layer.lora_B))
            n = self.modules[0].get_weight_norm(self._base_weight().float(), b @ a, scaling)
            self._factors_and_norm = (a, b, n)
        a, b, norm = self._factors_and_norm
        return (base + scaling * F.linear(F.linear(x, a), b)) / norm
