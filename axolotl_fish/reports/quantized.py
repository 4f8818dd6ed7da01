"""The line that says a run's base model is quantized (QLoRA), read off the model's own layers."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

# bitsandbytes layer class -> bits per weight
BITS = {"Linear4bit": 4, "Linear8bitLt": 8}


def quantized_base(model: nn.Module) -> str | None:
    """How many bitsandbytes linears of `model` hold quantized weights, by kind (`_layout`);
    None if there are none."""
    bnb = sys.modules.get("bitsandbytes.nn")  # not imported: the model has none of its layers
    if bnb is None:
        return None
    counts: Counter[str] = Counter()
    for module in model.modules():
        for name, bits in BITS.items():
            if isinstance(module, getattr(bnb, name)) and (layout := _layout(module, bits)):
                counts[f"{name} ({layout})"] += 1
    if not counts:
        return None
    layers = ", ".join(f"{count} bitsandbytes {kind}" for kind, count in sorted(counts.items()))
    return f"the base model is quantized: {layers} layers; the mask covers the adapter only"


def _layout(module: nn.Module, bits: int) -> str | None:
    """How the layer stores its weights if they are quantized: 4-bit ones packed several per
    stored element (Axolotl stores 4 NF4 codes per bf16 element), 8-bit ones as int8; None for a
    layer left dense (one stored element per weight, in a float dtype)."""
    weight = module.weight
    per_element = weight.element_size() * 8 // bits
    if weight.numel() * per_element != module.in_features * module.out_features:
        return None
    if bits == 8:
        return "int8" if weight.dtype == torch.int8 else None
    return f"{weight.quant_type}, {per_element} per {str(weight.dtype).removeprefix('torch.')}"
