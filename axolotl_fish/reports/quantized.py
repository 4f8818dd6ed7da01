"""The line that says a run's base model is quantized (QLoRA), read off the model's own layers."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

# bitsandbytes layer class -> (dtype of its stored weight, weights per stored element)
LAYOUTS = {"Linear4bit": (torch.uint8, 2), "Linear8bitLt": (torch.int8, 1)}


def quantized_base(model: nn.Module) -> str | None:
    """How many bitsandbytes linears of `model` hold quantized weights, by kind (4-bit with its
    quantization type, 8-bit); None if there are none."""
    bnb = sys.modules.get("bitsandbytes.nn")  # not imported: the model has none of its layers
    if bnb is None:
        return None
    counts: Counter[str] = Counter()
    for module in model.modules():
        for name, (dtype, per_element) in LAYOUTS.items():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, getattr(bnb, name))
                and weight is not None
                and weight.dtype == dtype
                and weight.numel() * per_element == module.in_features * module.out_features
            ):
                kind = getattr(weight, "quant_type", "int8")
                counts[
                    f"{name} ({kind}, {per_element} per {str(dtype).removeprefix('torch.')})"
                ] += 1
    if not counts:
        return None
    layers = ", ".join(f"{count} bitsandbytes {kind}" for kind, count in sorted(counts.items()))
    return f"the base model is quantized: {layers} layers; the mask covers the adapter only"
