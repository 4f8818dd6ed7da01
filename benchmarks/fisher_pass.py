"""Time of our Fisher pass vs the physical limit and vs the batch-size-1 loop peers use.

    python benchmarks/fisher_pass.py [--samples 256] [--micro-batch 8] [--repeats 3] [--dora]
        [--embedding]

- ours: `fisher_scores` (batched exact per-example squared gradients);
- limit: one ordinary forward+backward over the same micro-batches (what training costs);
- reference: one forward+backward per example (FISH's and the re-implementations' loop).
Runs are interleaved in one process and repeated; medians are reported. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import (
    add_common_args,
    demo_batches,
    lora_model,
    machine,
    median,
    peak_in_subprocess,
    plain_forward_backward,
    process_peak_bytes,
    reset_peak,
    timed,
)

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.fisher.scores import fisher_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--dora", action="store_true", help="DoRA instead of plain LoRA")
    parser.add_argument("--embedding", action="store_true", help="the input embedding too")
    args = parser.parse_args()

    model = lora_model(args.model, args.rank, args.device, dora=args.dora, embedding=args.embedding)
    params = adapter_parameters(model)
    batches = demo_batches(args.model, args.data, args.samples, args.micro_batch, args.device)
    n = args.samples
    runs = {
        "ours": lambda: fisher_scores(model, batches, params, n, progress=False),
        "limit": lambda: plain_forward_backward(model, batches),
        "reference": lambda: fisher_scores(
            model, batches, params, n, batched=False, progress=False
        ),
    }
    if args.peak_of:
        reset_peak(args.device)
        runs[args.peak_of]()
        print(json.dumps({"peak_bytes": process_peak_bytes(args.device)}))
        return
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run, args.device))
            print(f"round {round_ + 1} {name:9s} {seconds[name][-1]:7.2f} s", flush=True)
    peaks = {name: peak_in_subprocess(name) for name in runs}

    ours = fisher_scores(model, batches, params, n, progress=False).scores
    reference = fisher_scores(model, batches, params, n, batched=False, progress=False).scores
    max_rel_error = max(
        float((ours[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference
    )
    total = sum(p.numel() for p in params.values())
    kind = "DoRA" if args.dora else "LoRA"
    targets = "q,k,v,o" + (" and embed_tokens" if args.embedding else "")
    print(f"\n{machine()}; SmolLM2-135M, {kind} r={args.rank} on {targets} ({total:,} entries)")
    print(f"N={n} examples, micro-batch {args.micro_batch}, {args.repeats} interleaved rounds\n")
    print("| run | median s | per example ms | process peak memory MiB |")
    print("| --- | --- | --- | --- |")
    for name in runs:
        s = median(seconds[name])
        print(f"| {name} | {s:.2f} | {1000 * s / n:.1f} | {peaks[name] / 2**20:.0f} |")
    result = {
        "ours_over_limit": round(median(seconds["ours"]) / median(seconds["limit"]), 3),
        "ours_over_reference": round(median(seconds["ours"]) / median(seconds["reference"]), 3),
        "max_rel_error": max_rel_error,
        "peak_mib": {name: round(peaks[name] / 2**20) for name in runs},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
