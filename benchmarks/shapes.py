"""What the shape and step benchmarks share: the published sizes of the models they build with
random weights (weights do not change timings), the random model and random batches, and the
training step they time. torch and transformers only: the device scripts import it on a machine
without the package's dependencies."""

from __future__ import annotations

import argparse

import torch
from torch import nn

# transformers model type and sizes of each shape (the published configurations' sizes).
SHAPES: dict[str, tuple[str, dict[str, int | bool]]] = {
    "tiny": (
        "llama",
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        {
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    ),
    "llama-2-7b": (
        "llama",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
    ),
}


def add_batch_args(parser: argparse.ArgumentParser, seq: int, answer: int) -> None:
    """--device, --micro-batch, --seq and --answer (what `random_batches` reads)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=seq, help="tokens per row")
    parser.add_argument("--answer", type=int, default=answer, help="labelled tokens per row")


def random_model(shape: str, device: str) -> nn.Module:
    """A causal LM of this shape with random weights, in bf16, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, sizes = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(kind, **sizes), dtype=torch.bfloat16
        )
    return model


def random_batches(args: argparse.Namespace, vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    """`n` rows of random tokens in micro-batches, only the last `args.answer` tokens labelled."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, args.micro_batch):
        rows = min(args.micro_batch, n - start)
        ids = torch.randint(vocab, (rows, args.seq), generator=generator)
        labels = ids.clone()
        labels[:, : args.seq - args.answer] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        batches.append({key: value.to(args.device) for key, value in batch.items()})
    return batches


class TimedStep:
    """A model copy with AdamW (weight decay 0.01) over its trainable tensors and an optional
    mask (anything with `restore()`, called after each step as the callback does): one `step` is
    forward, backward, clip_grad_norm (1.0), the optimizer step, zero_grad and the restore."""

    def __init__(self, model: nn.Module, mask: object | None = None) -> None:
        self.model, self.mask = model, mask
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4, weight_decay=0.01)
        model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mask is not None:
            self.mask.restore()
