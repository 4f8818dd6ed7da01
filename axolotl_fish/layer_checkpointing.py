"""Activation checkpointing of a transformers model's decoder layers while the mask is made.

The Fisher pass runs in eval mode (no dropout), and transformers checkpoints its decoder layers
(`GradientCheckpointingLayer`) only in training mode: with `gradient_checkpointing` on, a pass
would otherwise hold every layer's activations for a micro-batch - more memory than the
checkpointed training steps it precedes. `checkpointed_layers` makes each layer recompute its
forward during backward for as long as the context lasts, in eval mode too, with PyTorch's
non-reentrant checkpoint: the pass's recording taps see every call of the first forward, and
the recomputation, which runs after it, records nothing (a reentrant checkpoint would run the
first forward without gradient). Layers already inside a `checkpoint_wrapper` (FSDP2's
`activation_checkpointing`) recompute anyway and are left alone, and so is a layer that
transformers checkpoints itself (in training mode with checkpointing on: a dense warm-up).
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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformers decoder layers that no `checkpoint_wrapper` already holds."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapped = {
        id(inner)
        for wrapper in model.modules()
        if isinstance(wrapper, CheckpointWrapper)
        for inner in wrapper.modules()
    }
    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and id(module) not in wrapped
    ]


# The call of a checkpointed layer that is running now, in its forward or in its recomputation
# (the same number for both: a recomputed module call is paired with its first-forward call).
_REGION: ContextVar[int | None] = ContextVar("fish_checkpointed_call", default=None)
_CALLS = itertools.count()


def current_region() -> int | None:
    """Which call of a layer within `checkpointed_layers` is running, if one is."""
    return _REGION.get()


def recomputed_modules(model: nn.Module) -> set[nn.Module]:
    """Every module inside a decoder layer that backward recomputes whole right now (within
    `checkpointed_layers`; a `checkpoint_wrapper` may stop its recomputation early)."""
    return {
        inner for layer in model.modules() if _checkpointed_here(layer) for inner in layer.modules()
    }


def _checkpointed_here(layer: nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return isinstance(forward, partial) and forward.func is _recomputed


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on for some decoder layer of `model`."""
    return any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model))


@contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[int]:
    """Within the context every decoder layer of `model` recomputes its forward in backward;
    yields how many layers that is. Nested use leaves the outer wrapping in place."""
    layers = [layer for layer in decoder_layers(model) if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = partial(_recomputed, layer, type(layer).forward.__get__(layer))
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def _recomputed(layer: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        return forward(*args, **kwargs)  # inside transformers' own checkpoint
    region = next(_CALLS)

    def run(*args: Any, **kwargs: Any) -> Any:
        token = _REGION.set(region)
        try:
            return forward(*args, **kwargs)
        finally:
            _REGION.reset(token)

    # The whole forward again, not stopped once the saved tensors are back: the recording taps
    # take each call's input when its module runs again (`fisher_taps`).
    return checkpoint(run, *args, use_reentrant=False, early_stop=False, **kwargs)
