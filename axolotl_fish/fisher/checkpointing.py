"""Activation checkpointing of a model's decoder layers while the mask is made.

The Fisher pass runs in eval mode (no dropout), and transformers checkpoints its decoder layers
(`GradientCheckpointingLayer`) only in training mode: with `gradient_checkpointing` on, a pass
would otherwise hold every layer's activations for a micro-batch - more memory than the
checkpointed training steps it precedes. Within `checkpointed_layers` each decoder layer
recomputes its forward during backward, in eval mode too, and so does each layer a
`checkpoint_wrapper` holds (FSDP2's `activation_checkpointing`), all through one checkpoint:
PyTorch's non-reentrant one (a reentrant one would run the first forward without gradient, and
the recording taps would see nothing), recomputing the whole forward (not stopping once the
saved tensors are back) and numbering each layer call, in its forward and in its
recomputation alike, so the taps (`fisher_taps`) can record a module's input when backward
recomputes it and pair it with its own call. A layer that transformers checkpoints itself (in
training mode with checkpointing on: a dense warm-up) gets no second checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import checkpoint

# The call of a checkpointed layer that is running now, in its forward or in its recomputation
# (the same number for both).
_REGION: ContextVar[int | None] = ContextVar("fish_checkpointed_call", default=None)
_CALLS = itertools.count()


def current_region() -> int | None:
    """Which call of a layer within `checkpointed_layers` is running, if one is."""
    return _REGION.get()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformers decoder layers that no `checkpoint_wrapper` already holds."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped = {id(inner) for wrapper in _wrappers(model) for inner in wrapper.modules()}
    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and id(module) not in wrapped
    ]


def _wrappers(model: nn.Module) -> list[CheckpointWrapper]:
    return [module for module in model.modules() if isinstance(module, CheckpointWrapper)]


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether some layer of `model` is checkpointed: transformers' gradient checkpointing, or
    a `checkpoint_wrapper`."""
    layers = decoder_layers(model)
    return bool(_wrappers(model)) or any(
        getattr(m, "gradient_checkpointing", False) for m in layers
    )


def recomputed_modules(model: nn.Module) -> set[nn.Module]:
    """Every module inside a layer that backward recomputes whole, call by numbered call, right
    now (within `checkpointed_layers`)."""
    layers = [layer for layer in model.modules() if _checkpointed_here(layer)]
    return {inner for layer in layers for inner in layer.modules()}


def _checkpointed_here(layer: nn.Module) -> bool:
    if isinstance(layer, CheckpointWrapper):
        return layer.checkpoint_fn is _numbered_checkpoint
    forward = vars(layer).get("forward")
    return isinstance(forward, partial) and forward.func is _recomputed


@contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[int]:
    """Within the context every decoder layer of `model` recomputes its forward in backward;
    yields how many layers that is. Nested use leaves the outer context's layers to it."""
    layers = [layer for layer in decoder_layers(model) if "forward" not in vars(layer)]
    wrappers = {w: w.checkpoint_fn for w in _wrappers(model) if not _checkpointed_here(w)}
    for layer in layers:
        layer.forward = partial(_recomputed, layer, type(layer).forward.__get__(layer))
    for wrapper in wrappers:
        wrapper.checkpoint_fn = _numbered_checkpoint
    try:
        yield len(layers) + len(wrappers)
    finally:
        for layer in layers:
            del layer.forward
        for wrapper, checkpoint_fn in wrappers.items():
            wrapper.checkpoint_fn = checkpoint_fn


def _recomputed(layer: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        return forward(*args, **kwargs)  # inside transformers' own checkpoint
    return _numbered_checkpoint(forward, *args, **kwargs)


def _numbered_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    region = next(_CALLS)

    def run(*args: Any, **kwargs: Any) -> Any:
        token = _REGION.set(region)
        try:
            return function(*args, **kwargs)
        finally:
            _REGION.reset(token)

    return checkpoint(run, *args, use_reentrant=False, early_stop=False, **kwargs)
