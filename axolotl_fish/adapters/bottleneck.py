"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021) for Hugging Face causal LMs.

An adapter is a down-projection, a nonlinearity and an up-projection with a residual,
`h + up(act(down(h)))`, applied to the output of a decoder layer's sublayer (before the layer's
own residual add). `houlsby` places one after the attention and one after the MLP of every
decoder layer; `pfeiffer` only after the MLP. The up-projection starts at zero, so a freshly
adapted model computes exactly what the base model computes.

Each adapter is a child module named `bottleneck` of its sublayer (`model.layers.3.mlp.bottleneck`)
and a forward hook adds it to the sublayer's output, so the base model's own parameter names are
unchanged. The adapter's tensors are saved as `bottleneck_adapter.safetensors` (keyed like the
model's state dict, which is also how a FISH mask keys them) next to `bottleneck_config.json`;
`load_bottleneck` puts a saved adapter on a base model:

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    load_bottleneck(model, "outputs/run")      # the folder holding the two files
    model.eval()

Usable with any HF `Trainer`: `add_bottleneck(model, BottleneckConfig(size=64))`, train, and
`trainer.add_callback(BottleneckSaveCallback(model))` writes the adapter into every checkpoint
and into `output_dir` at the end (under FSDP2 every rank gathers it and the first writes it).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from axolotl_fish.base.atomic import write_atomically
from axolotl_fish.base.sharded import full_tensor

LOG = logging.getLogger(__name__)

ADAPTER_FILENAME = "bottleneck_adapter.safetensors"
CONFIG_FILENAME = "bottleneck_config.json"
# The adapter's module name inside its sublayer, and its two projections.
MODULE_NAME = "bottleneck"
DOWN, UP = "down", "up"
# Child names that identify a decoder layer's attention and MLP sublayers (Llama, Qwen2,
# Mistral, Gemma: self_attn / mlp; GPT-2: attn / mlp; others: attention / feed_forward).
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
_NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class BottleneckConfig(BaseModel):
    """Where bottleneck adapters go, how wide they are and how they start."""

    model_config = ConfigDict(extra="forbid")

    placement: Literal["houlsby", "pfeiffer"] = Field(
        default="houlsby",
        description="`houlsby`: after the attention and the MLP of every decoder layer; "
        "`pfeiffer`: after the MLP only.",
    )
    size: int = Field(
        default=64, ge=1, description="Bottleneck width (the down-projection's outputs)."
    )
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        default="relu", description="Activation between the down- and the up-projection."
    )
    init: Literal["kaiming_uniform", "normal"] = Field(
        default="kaiming_uniform",
        description="Down-projection weights: `kaiming_uniform` (nn.Linear's default) or "
        "`normal` (mean 0, std `init_std`). Biases and the up-projection start at 0.",
    )
    init_std: float = Field(default=0.02, gt=0.0, description="Standard deviation for `normal`.")
    init_seed: int = Field(
        default=42, description="Seeds the down-projections' initialisation (reproducible)."
    )


class BottleneckAdapter(nn.Module):
    """`h + up(act(down(h)))`, computed in the adapter's dtype (fp32) and returned in h's."""

    def __init__(self, hidden_size: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, config.size)
        self.act = _NONLINEARITIES[config.nonlinearity]()
        self.up = nn.Linear(config.size, hidden_size)
        self.settings = config.model_dump()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        return hidden + self.up(self.act(self.down(x))).to(hidden.dtype)


def add_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Insert fresh adapters into `model` (in place), freeze every other parameter, and return it.

    The model computes exactly what it computed before (the up-projections are 0); only the
    adapters require gradients.
    """
    hidden_size = _hidden_size(model)
    sublayers = _sublayers(model, config.placement)
    generator = torch.Generator().manual_seed(config.init_seed)
    model.requires_grad_(False)
    for sublayer in sublayers:
        if hasattr(sublayer, MODULE_NAME):
            raise ValueError(f"{type(sublayer).__name__} already has a bottleneck adapter.")
        adapter = BottleneckAdapter(hidden_size, config)
        _initialise(adapter, config, generator)
        device = next(sublayer.parameters()).device
        sublayer.add_module(MODULE_NAME, adapter.to(device=device, dtype=torch.float32))
        sublayer.register_forward_hook(_add_adapter_output)
    LOG.info(describe_bottleneck(model))
    return model


def bottleneck_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter, keyed by its name in the model's state dict."""
    return {
        name: param
        for module_name, module in model.named_modules()
        if isinstance(module, BottleneckAdapter)
        for name, param in module.named_parameters(prefix=module_name)
    }


def describe_bottleneck(model: nn.Module) -> str:
    """One line for a model with bottleneck adapters: how many of which kind, and their
    trainable parameters."""
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    settings = adapters[0].settings
    return (
        f"bottleneck: {len(adapters)} {settings['placement']} adapters of size "
        f"{settings['size']} ({settings['nonlinearity']}), "
        f"{sum(p.numel() for p in bottleneck_parameters(model).values()):,} trainable "
        f"parameters; the base model is frozen"
    )


def bottleneck_settings(model: nn.Module) -> dict[str, Any] | None:
    """The settings of the adapters on `model` (what `add_bottleneck` was given), or None."""
    adapter = next((m for m in model.modules() if isinstance(m, BottleneckAdapter)), None)
    return None if adapter is None else adapter.settings


def gathered_bottleneck(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole and on the CPU, keyed like `bottleneck_parameters`. Under
    FSDP2 this gathers each sharded tensor: a collective, which every rank must call."""
    return {
        key: full_tensor(param.detach()).to("cpu").contiguous()
        for key, param in bottleneck_parameters(model).items()
    }


def save_bottleneck(
    model: nn.Module,
    folder: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter (safetensors, atomically) and its config (JSON) into `folder`:
    `tensors` (from `gathered_bottleneck`, on every rank of a sharded model) or, if not given,
    the model's own (which must then be whole)."""
    settings = bottleneck_settings(model)
    if settings is None:
        raise ValueError("The model has no bottleneck adapter to save.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = gathered_bottleneck(model)
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    config = {"bottleneck": settings, "base_model_name_or_path": name}
    write_atomically(folder / ADAPTER_FILENAME, lambda tmp: save_file(tensors, tmp))
    write_atomically(
        folder / CONFIG_FILENAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n")
    )
    return folder


def load_bottleneck(model: nn.Module, folder: str | os.PathLike[str]) -> nn.Module:
    """Put the adapter saved in `folder` on the base `model` (in place) and return it.

    The model then computes what the trained model computed. Raises, naming the tensor, if the
    saved adapter does not fit the model (another architecture or hidden size).
    """
    folder = Path(folder)
    config_path, adapter_path = folder / CONFIG_FILENAME, folder / ADAPTER_FILENAME
    for path in (config_path, adapter_path):
        if not path.is_file():
            raise FileNotFoundError(f"No bottleneck adapter in {folder}: {path.name} is missing.")
    saved = json.loads(config_path.read_text())
    add_bottleneck(model, BottleneckConfig(**saved["bottleneck"]))
    tensors = load_file(adapter_path)
    params = bottleneck_parameters(model)
    for key in sorted(set(params) ^ set(tensors)):
        where = "the saved adapter lacks" if key in params else "the model has no adapter tensor"
        raise ValueError(f"{adapter_path} does not fit this model: {where} {key!r}.")
    with torch.no_grad():
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{adapter_path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the "
                    f"model's adapter {tuple(param.shape)}."
                )
            param.copy_(tensors[key])
    LOG.info(f"bottleneck: loaded {len(tensors)} adapter tensors from {adapter_path}")
    return model


class BottleneckSaveCallback(TrainerCallback):
    """Writes the adapter into every checkpoint and, when training ends, into `output_dir`."""

    def __init__(self, model: nn.Module) -> None:
        if bottleneck_settings(model) is None:
            raise ValueError("BottleneckSaveCallback needs a model with a bottleneck adapter.")
        self.model = model

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._save(state, checkpoint)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._save(state, Path(args.output_dir))

    def _save(self, state: TrainerState, folder: Path) -> None:
        """Every rank gathers the adapter (FSDP2 shards it); the first process writes it."""
        tensors = gathered_bottleneck(self.model)
        if state.is_world_process_zero:
            save_bottleneck(self.model, folder, tensors)


def _add_adapter_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the sublayer's output (or the first element of its output tuple, as
    attention modules return (output, weights)) through the sublayer's adapter."""
    adapter = getattr(module, MODULE_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _initialise(
    adapter: BottleneckAdapter, config: BottleneckConfig, generator: torch.Generator
) -> None:
    with torch.no_grad():
        if config.init == "normal":
            adapter.down.weight.normal_(0.0, config.init_std, generator=generator)
        else:
            nn.init.kaiming_uniform_(adapter.down.weight, a=math.sqrt(5), generator=generator)
        for tensor in (adapter.down.bias, adapter.up.weight, adapter.up.bias):
            tensor.zero_()


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(
            "bottleneck adapters need the model's width: the model has no config.hidden_size."
        )
    return size


def _sublayers(model: nn.Module, placement: str) -> list[nn.Module]:
    """The sublayers that get an adapter, in layer order: the attention (houlsby only) and the
    MLP of every decoder layer (the elements of the model's first nn.ModuleList of layers that
    all have an MLP child)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            mlps = [_child(layer, MLP_NAMES) for layer in module]
            if all(mlp is not None for mlp in mlps):
                break
    else:
        raise ValueError(
            f"bottleneck: found no decoder layers (an nn.ModuleList whose layers have a child "
            f"named one of {MLP_NAMES}) in {type(model).__name__}."
        )
    if placement == "pfeiffer":
        return mlps
    sublayers = []
    for index, (layer, mlp) in enumerate(zip(module, mlps, strict=True)):
        attention = _child(layer, ATTENTION_NAMES)
        if attention is None:
            raise ValueError(
                f"bottleneck: decoder layer {index} ({type(layer).__name__}) has no attention "
                f"child named one of {ATTENTION_NAMES}; use placement: pfeiffer."
            )
        sublayers += [attention, mlp]
    return sublayers


def _child(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next(
        (getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)), None
    )
