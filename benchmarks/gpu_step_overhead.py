"""LoRA training steps with and without a mask on a GPU, at Qwen2.5 shapes in bf16.

    python benchmarks/gpu_step_overhead.py [--shape qwen2.5-0.5b] [--out results.jsonl]

Without `--shape`, both shapes: one command, a few minutes on one H100. Needs torch,
transformers and peft only: the masking module is imported without the package's `__init__`
(which needs pydantic and pluggy, absent on a bare GPU machine). Per shape (published sizes,
random weights: weights do not change timings),
LoRA r=16 on every linear layer of the decoder (q, k, v, o, gate, up, down; PEFT's fp32
factors on the bf16 model), one copy of the model per variant, all on the device at once:
- plain: plain LoRA;
- masked: a 50% random mask on every LoRA tensor through `GradientMask` (every tensor partly
  masked: the worst case);
- per_tensor: the same mask applied the way it was before issue 40, for reference: one
  `masked_fill_` per tensor in its gradient hook and one `torch.where` per tensor after the step.
A step is forward, backward, clip_grad_norm (1.0), AdamW (weight decay 0.01) step, zero_grad and
the mask's restore, on one micro-batch of `--micro-batch` rows of `--seq` random tokens, the last
`--answer` labelled. `--rounds` rounds interleave the variants, `--steps` steps each after a
warm-up step; times are medians of CUDA-synchronised steps. On a GPU, the kernels one step
launches are counted with torch.profiler. Every result is printed (and appended to `--out`) as a
JSON line; the last line sums up the ratios to plain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from shapes import SHAPES, TimedStep, add_batch_args, random_batches, random_model
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["plain", "masked", "per_tensor"]


def masking_module() -> types.ModuleType:
    """`axolotl_fish.training.masking`, its packages stood in for by empty ones."""
    root = Path(__file__).resolve().parents[1] / "axolotl_fish"
    for name, folder in [("", root), (".base", root / "base"), (".training", root / "training")]:
        package = types.ModuleType("axolotl_fish" + name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(package.__name__, package)
    return importlib.import_module("axolotl_fish.training.masking")


def lora_model(shape: str, device: str) -> nn.Module:
    """A random bf16 model of this shape with a fresh LoRA on every linear layer, lora_B moved
    off zero (as after a few steps)."""
    from peft import LoraConfig, get_peft_model

    base = random_model(shape, device)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    return model


class PerTensorMask:
    """The masking before issue 40, for reference: a kernel per tensor in backward and after
    the step."""

    def __init__(self, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
        self.items = [(p, ~m, p.detach().clone()) for p, m in zip(params, masks, strict=True)]
        for param, frozen, _ in self.items:
            param.register_post_accumulate_grad_hook(_zero_at(frozen))

    @torch.no_grad()
    def restore(self) -> None:
        for param, frozen, initial in self.items:
            torch.where(frozen, initial, param, out=param)


def _zero_at(frozen: torch.Tensor):
    def hook(param: nn.Parameter) -> None:
        param.grad.masked_fill_(frozen, 0.0)

    return hook


class Variant(TimedStep):
    def __init__(self, name: str, shape: str, device: str) -> None:
        model = lora_model(shape, device)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        generator = torch.Generator().manual_seed(0)
        masks = [(torch.rand(p.shape, generator=generator) < 0.5).to(device) for p in lora]
        mask = None
        if name == "masked":
            keys = [str(i) for i in range(len(lora))]
            mask = masking_module().GradientMask(
                dict(zip(keys, lora, strict=True)), dict(zip(keys, masks, strict=True))
            )
            mask.snapshot()
        elif name == "per_tensor":
            mask = PerTensorMask(lora, masks)
        super().__init__(model, mask)
        self.tensors = len(lora)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_seconds(variant: Variant, batch: dict[str, torch.Tensor], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    variant.step(batch)
    synchronize(device)
    return time.perf_counter() - start


def kernels_per_step(variant: Variant, batch: dict[str, torch.Tensor]) -> int:
    """GPU kernels (and memory copies and sets) that one step launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        variant.step(batch)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)


def measure(args: argparse.Namespace, shape: str) -> dict[str, object]:
    batch = random_batches(args, int(SHAPES[shape][1]["vocab_size"]), args.micro_batch)[0]
    variants = {name: Variant(name, shape, args.device) for name in VARIANTS}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for variant in variants.values():
        variant.step(batch)  # warm-up: allocator, optimizer state
    for round_ in range(args.rounds):
        for name, variant in variants.items():
            times = [step_seconds(variant, batch, args.device) for _ in range(args.steps)]
            seconds[name] += times
            row = {
                "shape": shape,
                "round": round_,
                "variant": name,
                "median_s": statistics.median(times),
            }
            report(args, row)
    result: dict[str, object] = {"shape": shape, "lora_tensors": variants["plain"].tensors}
    for name in VARIANTS:
        result[f"{name}_s"] = statistics.median(seconds[name])
        result[f"{name}_x_plain"] = round(
            statistics.median(seconds[name]) / statistics.median(seconds["plain"]), 4
        )
        if args.device.startswith("cuda"):
            result[f"{name}_kernels"] = kernels_per_step(variants[name], batch)
    report(args, result)
    return result


def report(args: argparse.Namespace, row: dict[str, object]) -> None:
    print(json.dumps(row), flush=True)
    if args.out is not None:
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES))
    add_batch_args(parser, seq=512, answer=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--out", type=Path, help="append each result here as a JSON line")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(json.dumps({"device": device, "torch": torch.__version__}), flush=True)
    results = [measure(args, shape) for shape in args.shape or ["qwen2.5-0.5b", "qwen2.5-1.5b"]]
    print("\n| shape | LoRA tensors | variant | s/step | x plain | kernels/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for result in results:
        for name in VARIANTS:
            kernels = result.get(f"{name}_kernels", "n/a")
            print(
                f"| {result['shape']} | {result['lora_tensors']} | {name} | "
                f"{result[f'{name}_s']:.4f} | {result[f'{name}_x_plain']:.3f} | {kernels} |"
            )
    summary = {r["shape"]: {n: r[f"{n}_x_plain"] for n in VARIANTS[1:]} for r in results}
    print(json.dumps({"x_plain": summary}))


if __name__ == "__main__":
    main()
