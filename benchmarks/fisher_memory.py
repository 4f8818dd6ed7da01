"""Peak memory of the LoRA Fisher pass against a plain forward+backward, a fresh process each.

    python benchmarks/fisher_memory.py [--rounds 3] [--tree DIR] [--gradient-checkpointing]

A random fp32 Llama-shaped model (`--hidden` wide, `--layers` deep), LoRA r=16 on q, k, v, o,
one micro-batch of 8 rows x 512 random tokens (the last 64 labelled). Each measurement runs in
its own process (peak RSS above the moment before the pass; on a GPU the allocator's peak), the
two runs alternating for `--rounds` rounds. `--tree` imports `axolotl_fish` from another
checkout (e.g. a `git worktree` of an older commit) to compare code versions on one machine.
`--gradient-checkpointing` turns on transformers' (non-reentrant) gradient checkpointing; the
limit is then a training-mode forward+backward, where transformers checkpoints.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, help="checkout to import axolotl_fish from")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one run, report its peak
    args = parser.parse_args()
    if args.tree is not None:  # ahead of an editable install's import hook
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, str(args.tree.resolve()))

    from common import peak_in_subprocess

    if args.peak_of:
        print(json.dumps({"peak_bytes": one_run(args)}))
        return
    peaks: dict[str, list[int]] = {"ours": [], "limit": []}
    for _ in range(args.rounds):
        for name, values in peaks.items():
            values.append(peak_in_subprocess(name))
    import axolotl_fish

    print(f"axolotl_fish from {Path(axolotl_fish.__file__).parent}")
    for name, values in peaks.items():
        print(f"{name}: " + " / ".join(f"{value / 2**20:,.0f}" for value in values) + " MiB")
    print(json.dumps({name: [round(v / 2**20) for v in values] for name, values in peaks.items()}))


def one_run(args: argparse.Namespace) -> int:
    """Peak bytes above the start of one Fisher pass (`ours`) or forward+backward (`limit`)."""
    import torch
    from common import add_lora, plain_forward_backward, process_peak_bytes, reset_peak
    from shapes import random_batches
    from transformers import AutoConfig, AutoModelForCausalLM

    from axolotl_fish.adapters.tensors import adapter_parameters
    from axolotl_fish.fisher.scores import fisher_scores

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = add_lora(AutoModelForCausalLM.from_config(config), 16, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = adapter_parameters(model)
    shape = argparse.Namespace(micro_batch=8, seq=512, answer=64, device=device)
    batches = random_batches(shape, config.vocab_size, 8)
    reset_peak(device)
    start = process_peak_bytes(device)
    if args.peak_of == "ours":
        fisher_scores(model, batches, params, 8, progress=False)
    else:
        plain_forward_backward(model, batches, training=args.gradient_checkpointing)
    return process_peak_bytes(device) - start


if __name__ == "__main__":
    main()
