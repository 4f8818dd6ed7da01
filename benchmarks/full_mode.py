"""Full-parameter FISH (no adapter): memory, step time and Fisher pass vs their baselines.

    python benchmarks/full_mode.py [--keep 0.005] [--steps 3] [--micro-batch 8] [--repeats 3]

On SmolLM2-135M (fp32), with a mask of `--keep` of all weights, each variant on its own copy
of the model and the same micro-batches:
- frozen: forward+backward with every weight frozen (input gradients only: the floor any
  training needs);
- dense: ordinary full fine-tuning (forward, backward, clip, AdamW, zero_grad);
- masked: the previous full-parameter mode (dense gradients zeroed outside the mask by hooks,
  dense AdamW state, a snapshot to restore masked entries after each step);
- sparse: the current mode (`SparseTraining`: frozen weights, trainable value vectors of the
  selected entries, AdamW state for k entries).
Step times are medians over interleaved rounds; peak memory is each variant's own process peak
(RSS on CPU) over the same steps. The Fisher pass over all weights is timed against a plain
forward+backward over the same micro-batches. Also prints the delta/full checkpoint size and
the 7B accounting. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    CACHE,
    demo_batches,
    machine,
    median,
    peak_in_subprocess,
    plain_forward_backward,
    process_peak_bytes,
    reset_peak,
    timed,
)
from torch import nn

from axolotl_fish.adapters.tensors import model_parameters
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores
from axolotl_fish.training.delta import DeltaRecorder
from axolotl_fish.training.masking import GradientMask
from axolotl_fish.training.sparse import SparseTraining


def base_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class Variant:
    """A model copy set up like one training mode, with its optimizer."""

    def __init__(self, name: str, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.name, self.model = name, model
        self.after_step = None
        params = model_parameters(model)
        if name == "frozen":
            model.requires_grad_(False)
            model.enable_input_require_grads()  # backward through every layer, no weight grads
        elif name == "masked":
            gradient_mask = GradientMask(params, masks)
            gradient_mask.snapshot()
            self.after_step = gradient_mask.restore
        elif name == "sparse":
            self.after_step = SparseTraining(model, params, masks).after_step
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.AdamW(self.trainable, lr=1e-5, weight_decay=0.01)
            if self.trainable
            else None
        )
        model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.model(**batch).loss.backward()
        if self.optimizer is None:
            return
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()


def seven_b_accounting(keep: float) -> dict[str, float]:
    """GB (1e9 bytes) of weights + optimizer-side state for Llama-2-7B in bf16 (AdamW states in
    the parameter dtype, as torch keeps them); activations A are the same for all three."""
    vocab, hidden, inter, layers = 32000, 4096, 11008, 32
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    params = layers * per_layer + 2 * vocab * hidden + hidden
    lora = layers * 16 * (4 * 2 * hidden + 2 * (hidden + inter) + (inter + hidden))
    k = round(keep * params)
    weights = 2 * params
    return {
        "params": params,
        "full_ft_gb": (weights + params * (2 + 2 + 2)) / 1e9,  # + grad, exp_avg, exp_avg_sq
        "lora_r16_gb": (weights + lora * (2 + 2 + 2 + 2)) / 1e9,  # + factors, grad, two moments
        # + per entry: value, int32 index, grad, two moments; + the largest dense weight gradient
        # (the embedding), which exists only while backward passes it.
        "fish_sparse_gb": (weights + k * (2 + 4 + 2 + 2 + 2) + 2 * vocab * hidden) / 1e9,
        "lora_params": lora,
        "k": k,
    }


def fisher_pass_runs(args: argparse.Namespace, device: str) -> dict[str, Callable[[], object]]:
    """The Fisher pass over all weights and a plain forward+backward over the same batches."""
    model = base_model(args.model)
    params = model_parameters(model)
    n = args.fisher_batches * args.micro_batch
    data = demo_batches(args.model, args.data, n, args.micro_batch, device)
    return {
        "fisher": lambda: fisher_scores(model, data, params, n, progress=False),
        "forward_backward": lambda: plain_forward_backward(model, data),
    }


def fisher_passes(args: argparse.Namespace, device: str, warm_up: bool) -> dict[str, list[float]]:
    """Seconds of each run of `fisher_pass_runs`, interleaved over `args.repeats` rounds."""
    runs = fisher_pass_runs(args, device)
    if warm_up:  # first-touch page faults of the score buffers, allocator growth
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run, device))
            print(f"round {round_ + 1} {name} {seconds[name][-1]:.2f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m")
    parser.add_argument("--data", type=Path, default=CACHE / "sentiment" / "train.jsonl")
    parser.add_argument("--keep", type=float, default=0.005)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--fisher-only",
        action="store_true",
        help="time only the Fisher pass against a plain forward+backward (one untimed warm-up "
        "pass of each first), e.g. to re-measure that ratio on an idle machine",
    )
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one run, report its peak
    args = parser.parse_args()
    device = "cpu"
    if args.fisher_only:
        fisher_seconds = fisher_passes(args, device, warm_up=True)
        for name, values in fisher_seconds.items():
            print(f"{name}: " + " ".join(f"{v:.2f}" for v in values) + " s")
        ratio = median(fisher_seconds["fisher"]) / median(fisher_seconds["forward_backward"])
        print(json.dumps({"fisher_time_ratio": round(ratio, 3)}))
        return

    params = model_parameters(base_model(args.model))
    total = sum(p.numel() for p in params.values())
    k = round(args.keep * total)
    masks = select_top_k(random_scores(params, seed=0), k, seed=0).masks
    batches = demo_batches(
        args.model, args.data, args.steps * args.micro_batch, args.micro_batch, device
    )
    names = ["frozen", "dense", "masked", "sparse"]
    if args.peak_of:
        variant = Variant(args.peak_of, base_model(args.model), masks)
        reset_peak(device)
        for batch in batches:
            variant.step(batch)
        print(json.dumps({"peak_bytes": process_peak_bytes(device)}))
        return

    variants = {name: Variant(name, base_model(args.model), masks) for name in names}
    for variant in variants.values():  # warm-up: allocator, optimizer state
        variant.step(batches[0])
    passes = fisher_pass_runs(args, device)
    n = args.fisher_batches * args.micro_batch
    seconds: dict[str, list[float]] = {name: [] for name in [*names, *passes]}
    for round_ in range(args.repeats):
        for name, variant in variants.items():
            for batch in batches:
                seconds[name].append(timed(lambda v=variant, b=batch: v.step(b), device))
            print(
                f"round {round_ + 1} {name:8s} {median(seconds[name][-len(batches) :]):.3f} s/step",
                flush=True,
            )
        for name, run in passes.items():
            seconds[name].append(timed(run, device))
            print(f"round {round_ + 1} {name} {seconds[name][-1]:.2f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        sparse = variants["sparse"].model
        sparse.save_pretrained(tmp)
        full_bytes = (Path(tmp) / "model.safetensors").stat().st_size
        state = sparse.state_dict()
        recorder = DeltaRecorder(sparse, {key: state[key] for key in masks}, masks)
        delta_bytes = recorder.delta().save(tmp).stat().st_size
    del variants
    peaks = {name: peak_in_subprocess(name) for name in names}

    print(f"\n{machine()}; SmolLM2-135M fp32 ({total:,} weights), keep {args.keep} (k={k:,})")
    print(
        f"micro-batch {args.micro_batch}, {args.steps} steps x {args.repeats} interleaved rounds\n"
    )
    print("| variant | median s/step | process peak memory MiB | peak / frozen |")
    print("| --- | --- | --- | --- |")
    for name in names:
        ratio = peaks[name] / peaks["frozen"]
        print(f"| {name} | {median(seconds[name]):.3f} | {peaks[name] / 2**20:.0f} | {ratio:.2f} |")
    print(
        f"\nFisher pass over all weights, {n} examples: {median(seconds['fisher']):.2f} s; plain "
        f"forward+backward over the same micro-batches: {median(seconds['forward_backward']):.2f} s"
    )
    print(
        f"fish_delta.safetensors {delta_bytes / 2**20:.2f} MiB, "
        f"model.safetensors {full_bytes / 2**20:.0f} MiB"
    )
    accounting = seven_b_accounting(args.keep)
    print(
        f"\n7B (Llama-2-7B shapes, bf16, + activations A): "
        f"full FT {accounting['full_ft_gb']:.1f} GB, LoRA r=16 {accounting['lora_r16_gb']:.1f} GB, "
        f"FISH sparse {accounting['fish_sparse_gb']:.1f} GB"
    )
    result = {
        "peak_ratio_sparse": round(peaks["sparse"] / peaks["frozen"], 3),
        "peak_ratio_masked_before": round(peaks["masked"] / peaks["frozen"], 3),
        "peak_ratio_dense": round(peaks["dense"] / peaks["frozen"], 3),
        "step_time_ratio_sparse": round(median(seconds["sparse"]) / median(seconds["dense"]), 3),
        "step_time_ratio_masked_before": round(
            median(seconds["masked"]) / median(seconds["dense"]), 3
        ),
        "fisher_time_ratio": round(
            median(seconds["fisher"]) / median(seconds["forward_backward"]), 3
        ),
        "delta_size_ratio": round(delta_bytes / full_bytes, 4),
        **{f"7b_{key}": round(value, 2) for key, value in accounting.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
