"""Which tensors a mask covers, and the names they are saved under.

Masks are keyed exactly like `adapter_model.safetensors` (PEFT drops the adapter name), so a
mask file can be checked key by key against the adapter it belongs to.
"""

from __future__ import annotations

import torch
from torch import nn


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """Every trainable parameter of a PEFT model, keyed by its name in the saved adapter.

    The mapping comes from PEFT's own `get_peft_model_state_dict` (matched by storage), so it
    follows PEFT's naming rules for LoRA, DoRA, embeddings and modules_to_save alike.
    """
    from peft.utils import get_peft_model_state_dict

    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not trainable:
        raise ValueError("The model has no trainable parameters: is a PEFT adapter attached?")
    # save_embedding_layers=False: "auto" may look up the base model's config on a model hub.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    saved_key = {tensor.data_ptr(): key for key, tensor in state.items()}
    params: dict[str, nn.Parameter] = {}
    for name, param in trainable.items():
        key = saved_key.get(param.data_ptr())
        if key is None:
            raise ValueError(
                f"Trainable parameter {name!r} is not part of the saved adapter "
                f"{adapter_name!r}; the mask only covers adapter tensors."
            )
        params[key] = param
    return params


def count_entries(tensors: dict[str, torch.Tensor]) -> int:
    """Total number of entries over all tensors."""
    return sum(t.numel() for t in tensors.values())
