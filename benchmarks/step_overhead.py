"""Training-step cost of a FISH mask vs plain LoRA, interleaved in one process.

    python benchmarks/step_overhead.py [--steps 10] [--micro-batch 8] [--repeats 3]

Variants, each on its own copy of the same LoRA model and the same batches:
- plain: ordinary LoRA;
- masked: a 50% mask spread over every tensor (the worst case: every tensor partly masked, so
  every tensor carries a gradient hook and is restored after each step);
- frozen_A: every lora_A tensor has an empty mask (B fully trainable), as Fisher masks at
  initialisation often are; A then needs no gradient at all.
A step is forward, backward, clip_grad_norm, AdamW (weight decay 0.01) step, zero_grad, and the
mask's restore. Medians over steps are reported.

Then the operators the mask adds to a step (`--count-at`, default 4, 28 and 196 partly masked
tensors; the other tensors fully selected, so the rest of the step is the plain one): every
operator dispatched during one step (after a warm-up step) is counted with a TorchDispatchMode,
the plain step's count is subtracted. A `_foreach_*` operator counts once (on a GPU it launches
one kernel per batch of up to a few dozen tensors; on a CPU it loops over them). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable

import torch
from common import (
    add_common_args,
    demo_batches,
    lora_model,
    machine,
    median,
    peak_in_subprocess,
    process_peak_bytes,
    reset_peak,
    timed,
)
from shapes import TimedStep
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores
from axolotl_fish.training.masking import GradientMask


class Variant(TimedStep):
    """A model copy with its optimizer and, optionally, a mask applied like the callback does."""

    def __init__(self, model, masks=None) -> None:
        mask = None
        if masks is not None:
            mask = GradientMask(adapter_parameters(model), masks)
            mask.snapshot()
        super().__init__(model, mask)


VARIANTS = ["plain", "masked", "frozen_A"]


def variant_masks(name: str, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """A variant's masks: none (plain), 50% at random over every tensor, or every lora_A empty."""
    if name == "masked":
        total = sum(p.numel() for p in params.values())
        return select_top_k(random_scores(params, seed=0), total // 2, seed=0).masks
    if name == "frozen_A":
        return {key: torch.full(p.shape, "lora_B" in key) for key, p in params.items()}
    return None


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.operators: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step_operators(variant: Variant, batch) -> Counter[str]:
    """The operators of one step, after a warm-up step (AdamW creates its state in the first)."""
    variant.step(batch)
    with OperatorCount() as count:
        variant.step(batch)
    return count.operators


def partly_masked(params: dict[str, nn.Parameter], n: int) -> dict[str, torch.Tensor]:
    """Half of each of the first `n` tensors' entries at random; the other tensors whole."""
    generator = torch.Generator().manual_seed(0)
    masks = {key: torch.ones(p.shape, dtype=torch.bool) for key, p in params.items()}
    for key in list(params)[:n]:
        masks[key] = torch.rand(params[key].shape, generator=generator) < 0.5
    return masks


def added_operators(
    fresh: Callable[[], nn.Module], batch, counts: list[int]
) -> dict[int, Counter[str]]:
    """`{n: the operators a mask over n partly masked tensors adds to a step}`."""
    plain = step_operators(Variant(fresh()), batch)
    added = {}
    for n in counts:
        model = fresh()
        masked = step_operators(Variant(model, partly_masked(adapter_parameters(model), n)), batch)
        if plain - masked:
            raise RuntimeError(
                f"the masked step lacks operators of the plain one: {plain - masked}"
            )
        added[n] = masked - plain
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument(
        "--count-at", type=int, action="append", help="partly masked tensors (4, 28, 196)"
    )
    parser.add_argument("--count-only", action="store_true", help="skip the timed rounds")
    args = parser.parse_args()
    counts = args.count_at or [4, 28, 196]

    def fresh():
        return lora_model(args.model, args.rank, args.device)

    params = adapter_parameters(fresh())
    total = sum(p.numel() for p in params.values())
    masks = {name: variant_masks(name, params) for name in VARIANTS}
    n_rows = args.steps * args.micro_batch
    batches = demo_batches(args.model, args.data, n_rows, args.micro_batch, args.device)
    if args.peak_of:
        variant = Variant(fresh(), masks[args.peak_of])
        reset_peak(args.device)
        for batch in batches:
            variant.step(batch)
        print(json.dumps({"peak_bytes": process_peak_bytes(args.device)}))
        return
    added = added_operators(fresh, batches[0], counts)
    print(f"{machine()}; {len(params)} LoRA tensors; operators the mask adds to a step:\n")
    print("| partly masked tensors | operators added | by name |")
    print("| --- | --- | --- |")
    for n, operators in added.items():
        names = ", ".join(f"{name} x{count}" for name, count in sorted(operators.items()))
        print(f"| {n} | {operators.total()} | {names} |")
    mask_operators = {str(n): operators.total() for n, operators in added.items()}
    if args.count_only:
        print(json.dumps({"mask_operators": mask_operators}))
        return
    variants = {name: Variant(fresh(), mask) for name, mask in masks.items()}
    for variant in variants.values():  # warm-up: allocator, optimizer state
        variant.step(batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for name, variant in variants.items():
            for batch in batches:
                seconds[name].append(timed(lambda v=variant, b=batch: v.step(b), args.device))
            step = median(seconds[name][-len(batches) :])
            print(f"round {round_ + 1} {name:8s} {step:.3f} s/step", flush=True)
    peaks = {name: peak_in_subprocess(name) for name in variants}

    print(f"\n{machine()}; SmolLM2-135M, LoRA r={args.rank} on q,k,v,o ({total:,} entries)")
    print(
        f"micro-batch {args.micro_batch}, {args.steps} steps x {args.repeats} interleaved rounds\n"
    )
    print("| variant | median s/step | process peak memory MiB |")
    print("| --- | --- | --- |")
    for name in variants:
        print(f"| {name} | {median(seconds[name]):.3f} | {peaks[name] / 2**20:.0f} |")
    plain = median(seconds["plain"])
    result = {
        "step_time_ratio": round(median(seconds["masked"]) / plain, 3),
        "peak_memory_ratio": round(peaks["masked"] / peaks["plain"], 3),
        "frozen_A_step_time_ratio": round(median(seconds["frozen_A"]) / plain, 3),
        "mask_operators": mask_operators,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
