"""LoRA training-step cost of a FISH mask under DeepSpeed ZeRO-2 and ZeRO-3, one process.

    PYTHONPATH=. python benchmarks/deepspeed_step.py [--shape qwen2.5-0.5b] [--steps 10]

For each stage, two engines on the same random bf16 model of `--shape` (sizes from
`real_shapes.py`) with LoRA r=`--rank` on q, k, v, o: `plain` and `masked` (50% of the adapter's
entries at random, every tensor partly masked: each carries a gradient hook and an fp32 master
slice restored after every step, the worst case). DeepSpeed steps a torch AdamW (weight decay
0.01; no `optimizer:` section, so nothing is JIT-built) in bf16 with gradient clipping. A step is
forward, `engine.backward`, `engine.step`; medians over `--steps` steps after 2 warm-up steps,
in `--repeats` interleaved rounds. Device peak memory (CUDA only) is the peak during the timed
steps. The last line is JSON: masked/plain ratios per stage.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import deepspeed
import deepspeed.ops
import torch
from common import TARGETS, machine, median, timed
from shapes import SHAPES, add_batch_args, random_batches, random_model

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.distributed.deepspeed import DeepSpeedFishMaskCallback
from axolotl_fish.masks.file import FishMask
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores

VARIANTS = ("plain", "masked")


class Engine:
    """One DeepSpeed engine over a fresh LoRA model, masked like the plugin does it or not."""

    def __init__(self, args: argparse.Namespace, stage: int, masked: bool) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        model = get_peft_model(random_model(args.shape, args.device), config)
        params = adapter_parameters(model)
        self.entries = sum(p.numel() for p in params.values())
        callback = None
        if masked:  # before initialize, as the plugin: its gradient hooks fire first
            selection = select_top_k(random_scores(params, seed=0), self.entries // 2, seed=0)
            mask = FishMask(masks=selection.masks, metadata={"k": self.entries // 2})
            callback = DeepSpeedFishMaskCallback(model, mask, zero3=stage == 3)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
        ds_config = {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
        if callback is not None:
            state = argparse.Namespace(is_world_process_zero=False)  # writes no mask file
            callback.on_train_begin(
                argparse.Namespace(output_dir=""),
                state,
                None,
                model=self.engine.module,
                optimizer=optimizer,
            )

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.engine(**batch).loss
        self.engine.backward(loss)
        self.engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--stage", type=int, action="append", choices=[2, 3])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    add_batch_args(parser, seq=256, answer=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if not cuda:  # DeepSpeed's shared-memory all-reduce (inference only) would be JIT-built
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    batches = random_batches(args, SHAPES[args.shape][1]["vocab_size"], args.micro_batch)
    results: dict[str, float] = {}
    rows = []
    for stage in args.stage or [2, 3]:
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        peaks: dict[str, int] = {}
        for round_ in range(args.repeats):
            for name in VARIANTS:
                engine = Engine(args, stage, masked=name == "masked")
                for _ in range(2):  # warm-up: allocator, optimizer state
                    engine.step(batches[0])
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = [
                    timed(partial(engine.step, batches[0]), args.device) for _ in range(args.steps)
                ]
                seconds[name] += times
                if cuda:
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                print(
                    f"ZeRO-{stage} round {round_ + 1} {name:6s} {median(times):.4f} s/step",
                    flush=True,
                )
                entries = engine.entries
                engine.engine.destroy()
                del engine  # before the next model is built
                if cuda:
                    torch.cuda.empty_cache()
        ratio = median(seconds["masked"]) / median(seconds["plain"])
        results[f"zero{stage}_step_time_ratio"] = round(ratio, 3)
        row = [f"ZeRO-{stage}", *(f"{median(seconds[n]):.4f}" for n in VARIANTS), f"{ratio:.3f}"]
        if peaks:
            memory = peaks["masked"] / peaks["plain"]
            results[f"zero{stage}_peak_memory_ratio"] = round(memory, 3)
            row += [f"{peaks[n] / 2**20:.0f}" for n in VARIANTS] + [f"{memory:.3f}"]
        rows.append(row)
    print(
        f"\n{machine()}; deepspeed {deepspeed.__version__}; {args.shape} (random bf16), LoRA "
        f"r={args.rank} on q,k,v,o ({entries:,} entries, 50% masked); micro-batch "
        f"{args.micro_batch} x {args.seq} tokens; {args.steps} steps x {args.repeats} rounds\n"
    )
    header = ["stage", "plain s/step", "masked s/step", "time ratio"]
    if cuda:
        header += ["plain peak MiB", "masked peak MiB", "memory ratio"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
