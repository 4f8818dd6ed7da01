"""Which tensors a mask covers, and the names they are saved under.

With a PEFT adapter, masks are keyed exactly like `adapter_model.safetensors` (PEFT drops the
adapter name); without one (full-parameter mode), like the model's own `model.safetensors`. Either
way a mask file can be checked key by key against the weights it belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from axolotl_fish.adapters.bottleneck import DOWN, MODULE_NAME, UP
from axolotl_fish.base.sharded import is_sharded


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable tensor, keyed by its name in the saved adapter (PEFT model) or in the
    saved model (any other model: full-parameter mode). Refused for a model FSDP2 has sharded:
    the keys are taken before sharding and followed by name (`sharded.names_of`)."""
    sharded = next((name for name, p in model.named_parameters() if is_sharded(p)), None)
    if sharded is not None:
        raise ValueError(
            f"fish_mask: parameter {sharded!r} is already sharded (a DTensor), so the tensors "
            f"cannot be matched to their saved names; take the names before the model is wrapped "
            f"(`sharded.names_of`) and look the tensors up after (`sharded.parameters_by_name`)."
        )
    if is_adapter_model(model):
        return adapter_parameters(model)
    return model_parameters(model)


def is_adapter_model(model: nn.Module) -> bool:
    """A PEFT model (its adapter is what trains), as opposed to a plain model (full-parameter)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trains_own_weights(model: nn.Module) -> bool:
    """Full-parameter mode: what trains are the model's own weights, not an adapter's (a PEFT
    adapter, or bottleneck adapters inserted into the model)."""
    from axolotl_fish.adapters.bottleneck import BottleneckAdapter

    return not is_adapter_model(model) and not any(
        isinstance(module, BottleneckAdapter) for module in model.modules()
    )


def model_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter of a plain model, keyed like its saved state dict.

    A tied tensor (lm_head.weight sharing embed_tokens' storage) is one tensor: it appears once,
    under the key `save_pretrained` keeps for it (transformers' own rule), so a mask never holds
    two disagreeing masks for one tensor.
    """
    saved_key: dict[int, str] = {}
    for key, tensor in saved_state(model).items():
        saved_key.setdefault(tensor.data_ptr(), key)
    params = {
        saved_key[param.data_ptr()]: param for param in model.parameters() if param.requires_grad
    }
    if not params:
        raise ValueError("The model has no trainable parameters.")
    return params


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes into `model.safetensors` (a tied tensor once)."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    if isinstance(model, PreTrainedModel):
        state = remove_tied_weights_from_state_dict(state, model)
    return state


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """Every trainable parameter of a PEFT model, keyed by its name in the saved adapter.

    The mapping comes from PEFT's own `get_peft_model_state_dict`, given the parameters
    themselves (`keep_vars`) and matched by identity, so it follows PEFT's naming rules for LoRA,
    DoRA, embeddings and modules_to_save alike, also for tensors without storage of their own
    (the meta device, where every storage address is 0).
    """
    from peft.utils import get_peft_model_state_dict

    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not trainable:
        raise ValueError("The model has no trainable parameters: is a PEFT adapter attached?")
    # save_embedding_layers=False: "auto" may look up the base model's config on a model hub.
    state = get_peft_model_state_dict(
        model,
        state_dict=model.state_dict(keep_vars=True),
        adapter_name=adapter_name,
        save_embedding_layers=False,
    )
    saved_key = {id(tensor): key for key, tensor in state.items()}
    params: dict[str, nn.Parameter] = {}
    for name, param in trainable.items():
        key = saved_key.get(id(param))
        if key is None:
            raise ValueError(
                f"Trainable parameter {name!r} is not part of the saved adapter "
                f"{adapter_name!r}; the mask only covers adapter tensors."
            )
        params[key] = param
    return params


def count_entries(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total number of entries over all tensors."""
    return sum(t.numel() for t in tensors.values())


def tensor_role(key: str) -> tuple[str, str]:
    """(module type, matrix) of a saved adapter key, e.g. ('q_proj', 'lora_A'), or for a
    bottleneck adapter's projection ('mlp', 'bottleneck.down')."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_") and i > 0:
            return parts[i - 1], part
        if part == MODULE_NAME and 0 < i < len(parts) - 1 and parts[i + 1] in (DOWN, UP):
            return parts[i - 1], f"{MODULE_NAME}.{parts[i + 1]}"
    return (parts[-2] if len(parts) > 1 else parts[0]), parts[-1]


def output_side_module(key: str) -> str | None:
    """The adapter module (its key prefix: `...q_proj`, `...mlp.bottleneck`) when `key` is on
    its output side - LoRA's `lora_B` or `lora_embedding_B`, a bottleneck adapter's
    up-projection (weight or bias) - else None."""
    matrix = tensor_role(key)[1]
    if matrix not in ("lora_B", "lora_embedding_B", f"{MODULE_NAME}.{UP}"):
        return None
    return key[: key.rindex("." + matrix.split(".")[-1])]


def layer_index(key: str) -> int | None:
    """The block a saved adapter key belongs to (the first all-digit name part:
    `...layers.3.self_attn...`, GPT-2's `...h.3.attn...`); None outside numbered blocks."""
    return next((int(part) for part in key.split(".") if part.isdigit()), None)


def natural_order(key: str) -> list[str | int]:
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def rank_axis(key: str) -> int | None:
    """Which axis of a LoRA factor has the adapter's rank: 0 for A (r x in), 1 for B (out x r);
    likewise the bottleneck size of a bottleneck adapter: 0 for the down-projection (weight
    size x hidden, bias size), 1 for the up-projection's weight (hidden x size). None for
    tensors whose size does not depend on the rank (DoRA magnitudes, full copies, the
    up-projection's bias)."""
    matrix = tensor_role(key)[1]
    if matrix in ("lora_A", "lora_embedding_A", f"{MODULE_NAME}.{DOWN}"):
        return 0
    if matrix in ("lora_B", "lora_embedding_B") or (
        matrix == f"{MODULE_NAME}.{UP}" and key.endswith(".weight")
    ):
        return 1
    return None
