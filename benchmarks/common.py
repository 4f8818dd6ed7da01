"""Shared pieces of the hand-run benchmarks: the demo model with LoRA, demo batches, peak memory.

Defaults point at what `make demo` builds (`.cache/axolotl-fish/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CACHE = Path(".cache/axolotl-fish")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m")
    parser.add_argument("--data", type=Path, default=CACHE / "sentiment" / "train.jsonl")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one run, report its peak


def lora_model(
    path: Path, rank: int, device: str, seed: int = 0, dora: bool = False, embedding: bool = False
) -> nn.Module:
    """The demo model (fp32) with a fresh LoRA (or DoRA) adapter on q, k, v, o (`add_lora`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return add_lora(base, rank, device, dora, embedding)


def add_lora(
    base: nn.Module, rank: int, device: str, dora: bool = False, embedding: bool = False
) -> nn.Module:
    """A fresh LoRA adapter on q, k, v, o and, with `embedding`, the input embedding (PEFT's
    defaults otherwise: fp32 factors; with `dora` DoRA's magnitude vectors too), with the factor
    PEFT starts at zero (lora_B; an embedding's A) perturbed away from it, as after a few
    training steps, so every Fisher score is informative."""
    from peft import LoraConfig, get_peft_model

    targets = [*TARGETS, "embed_tokens"] if embedding else TARGETS
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.05, use_dora=dora
    )
    model = get_peft_model(base, config).to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(std=1e-3)
    return model


def demo_batches(
    model_path: Path, data_path: Path, n: int, micro_batch: int, device: str
) -> list[dict[str, torch.Tensor]]:
    """The first `n` rows as Axolotl's alpaca format trains them: prompt masked with -100, the
    answer plus EOS as labels, right-padded per micro-batch."""
    from axolotl.prompters import AlpacaPrompter
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompter = AlpacaPrompter()
    rows = [json.loads(line) for line in data_path.read_text().splitlines()[:n]]
    examples = []
    for row in rows:
        prompt = next(prompter.build_prompt(row["instruction"], row["input"]))
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        examples.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]))
    batches = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), micro_batch):
        chunk = examples[start : start + micro_batch]
        width = max(len(ids) for ids, _ in chunk)
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
            "attention_mask": torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]
            ),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk]),
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def plain_forward_backward(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], training: bool = False
) -> None:
    """One ordinary forward+backward (with weight gradients) per micro-batch: the baseline the
    Fisher pass is timed against (`training`: in training mode, where transformers checkpoints
    its layers if gradient checkpointing is on)."""
    model.train(training)
    for batch in batches:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def reset_peak(device: str) -> None:
    """Start peak tracking now, so model loading does not count."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (peak RSS)


def process_peak_bytes(device: str) -> int:
    """Peak memory of the whole process since `reset_peak`: CUDA allocator peak, or peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        * 1024
    )


def peak_in_subprocess(name: str) -> int:
    """Run this script again with `--peak-of NAME` and read the peak it reports.

    A fresh process per run: in one process, memory freed by one run stays resident (allocator
    caches) and hides the next run's peak.
    """
    argv = [sys.executable, *sys.argv, "--peak-of", name]
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_bytes"]


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of fn(), synchronising a GPU around it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """One line on where the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores, {threads} torch threads (torch {torch.__version__})"
