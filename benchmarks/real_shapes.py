"""The core's cost on random-initialised models of real shapes in bf16, for a GPU.

    python benchmarks/real_shapes.py --shape qwen2.5-0.5b --shape llama-2-7b [--out results.jsonl]

Weights do not change timings or memory, so no checkpoint is needed: each model is built from its
shape with random weights, and the batches are random tokens (`--seq` long, the last `--answer`
of them labelled, as in an instruction example). Needs the core only (no Axolotl). Per shape:
- fisher_lora: the Fisher pass over a LoRA r=16 adapter on q, k, v, o (PEFT's fp32 factors on
  the bf16 model): ours vs a plain forward+backward over the same micro-batches (the limit) vs
  one forward+backward per example (the reference loop);
- lora_step: a training step with plain LoRA, with a 50% mask on every tensor and with every
  lora_A frozen (step_overhead.py's variants);
- full_fisher: the Fisher pass over every weight (full-parameter mode), in one pass and in
  `--fisher-chunks` chunks of tensors (scores of finished chunks in CPU memory), vs a plain
  forward+backward;
- full: full-parameter mode at each `--keep`: the exact top-k selection over random scores of
  every weight (every tensor partly selected, as in full_mode.py) and a step of full_mode.py's
  variants (frozen, dense, masked, sparse; sparse alone at the further keeps);
- fsdp2: a full-parameter sparse step at the first `--keep` under FSDP2 on a 1-rank mesh (model
  and value vectors made on the CPU, then sharded onto the device, as in a plugin run), with
  masked entries checked unchanged, against the same step without FSDP2;
- fisher_lora_fsdp2: fisher_lora's pass on the model FSDP2 sharded (1-rank mesh; every LoRA
  factor and DoRA magnitude a group of its own, as Axolotl shards them), as the plugin scores
  adapters under FSDP2, against the unsharded pass; their masks are checked equal.
`--dora` gives both LoRA sections DoRA adapters instead (magnitude vectors too).
Variants run one after another, each on its own fresh model that is freed before the next, so
each peak (the CUDA allocator's, reset after a warm-up run; on a CPU the process's peak RSS,
which is only an upper bound) holds that variant alone. Times are medians of `--repeats` passes
or `--steps` steps after one untimed warm-up run. Every result is appended to `--out` as a JSON
line as soon as it is measured, so a run cut short keeps what it finished; tables print last.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import full_mode
import step_overhead
import torch
from common import (
    add_lora,
    machine,
    median,
    plain_forward_backward,
    process_peak_bytes,
    reset_peak,
    timed,
)
from peft.tuners.lora import LoraLayer
from shapes import SHAPES, add_batch_args, random_batches, random_model
from torch import nn

from axolotl_fish.adapters.tensors import adapter_parameters, model_parameters
from axolotl_fish.base.sharded import names_of, parameters_by_name
from axolotl_fish.fisher.chunks import fisher_scores_in_chunks
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.masks.selection import select_top_k

Batch = dict[str, torch.Tensor]


class Recorder:
    """Times and peaks of named runs, each appended to the results file as it is measured."""

    def __init__(self, args: argparse.Namespace, shape: str) -> None:
        self.args, self.shape = args, shape
        self.rows: list[dict[str, object]] = []

    def measure(
        self,
        section: str,
        name: str,
        run: Callable[[], object],
        repeats: int | None = None,
        **extra: object,
    ) -> None:
        """One untimed warm-up run, then timed runs (`--repeats` unless given); the peak is over
        the timed ones."""
        device = self.args.device
        run()
        reset_peak(device)
        seconds = [timed(run, device) for _ in range(repeats or self.args.repeats)]
        self.add(section, name, median(seconds), process_peak_bytes(device), extra)

    def add(
        self, section: str, name: str, seconds: float, peak: int, extra: dict[str, object]
    ) -> None:
        row = {"shape": self.shape, "section": section, "run": name, "seconds": seconds}
        row |= {"peak_gib": peak / 2**30, **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.args.out is not None:
            with self.args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")

    def table(self, section: str, unit: str, baseline: str | None) -> str:
        """Markdown rows of one section, each against the `baseline` run (default: the first)."""
        rows = [row for row in self.rows if row["section"] == section]
        base = next(row for row in rows if row["run"] == baseline) if baseline else rows[0]
        baseline = base["run"]
        lines = [
            f"| {section} | {unit} | x {baseline} | peak GiB | x {baseline} peak |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            time_ratio = row["seconds"] / base["seconds"]
            peak_ratio = row["peak_gib"] / base["peak_gib"]
            lines.append(
                f"| {row['run']} | {row['seconds']:.3f} | {time_ratio:.3f} | "
                f"{row['peak_gib']:.2f} | {peak_ratio:.3f} |"
            )
        return "\n".join(lines)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fisher_lora(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    model = add_lora(random_model(shape, args.device), 16, args.device, args.dora)
    params = adapter_parameters(model)
    batches = random_batches(args, model.config.vocab_size, args.samples)
    n = args.samples
    entries = sum(p.numel() for p in params.values())
    runs = {
        "ours": lambda: fisher_scores(model, batches, params, n, progress=False),
        "limit": lambda: plain_forward_backward(model, batches),
        "reference": lambda: fisher_scores(
            model, batches, params, n, batched=False, progress=False
        ),
    }
    for name, run in runs.items():
        record.measure("fisher_lora", name, run, examples=n, entries=entries)


def lora_step(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    batch = random_batches(args, SHAPES[shape][1]["vocab_size"], args.micro_batch)[0]
    for name in step_overhead.VARIANTS:
        model = add_lora(random_model(shape, args.device), 16, args.device)
        masks = step_overhead.variant_masks(name, adapter_parameters(model))
        variant = step_overhead.Variant(model, masks)
        measure_steps(record, "lora_step", name, variant, batch)
        del model, variant
        free()


def measure_steps(record: Recorder, section: str, name: str, variant: Any, batch: Batch) -> None:
    record.measure(section, name, lambda: variant.step(batch), repeats=record.args.steps)


def full(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    scores = spread_scores(model_parameters(random_model(shape, args.device)))
    masks_at = {keep: select_masks(record, scores, keep) for keep in args.keep}
    del scores
    free()
    batch = random_batches(args, SHAPES[shape][1]["vocab_size"], args.micro_batch)[0]
    variants = [(name, args.keep[0]) for name in ["frozen", "dense", "masked", "sparse"]]
    variants += [("sparse", keep) for keep in args.keep[1:]]
    for name, keep in variants:
        variant = full_mode.Variant(name, random_model(shape, args.device), masks_at[keep])
        label = name if name in ("frozen", "dense") else f"{name} keep {keep}"
        measure_steps(record, "full_step", label, variant, batch)
        del variant
        free()


def full_fisher(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    """Time the Fisher pass over every weight against a plain forward+backward."""
    model = random_model(shape, args.device)
    params = model_parameters(model)
    n = args.micro_batch * 2
    batches = random_batches(args, model.config.vocab_size, n)
    total = sum(p.numel() for p in params.values())
    record.measure(
        "full_fisher",
        "fisher_all_weights",
        lambda: fisher_scores(model, batches, params, n, progress=False),
        examples=n,
        weights=total,
    )
    chunks = args.fisher_chunks
    record.measure(
        "full_fisher",
        f"fisher_all_weights, {chunks} chunks",
        lambda: fisher_scores_in_chunks(model, batches, params, n, chunks, progress=False),
        examples=n,
        weights=total,
    )
    record.measure(
        "full_fisher", "forward_backward", lambda: plain_forward_backward(model, batches)
    )


def spread_scores(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Uniform random scores for every weight, drawn on its device (as full_mode.py's masks:
    every tensor partly selected, the worst case for the dense-gradient `masked` mode)."""
    generator = torch.Generator(next(iter(params.values())).device).manual_seed(0)
    return {
        key: torch.rand(p.shape, generator=generator, device=p.device) for key, p in params.items()
    }


def select_masks(
    record: Recorder, scores: dict[str, torch.Tensor], keep: float
) -> dict[str, torch.Tensor]:
    """Time the exact top-k selection of `keep` of all entries; its masks."""
    k = round(keep * sum(score.numel() for score in scores.values()))
    masks: list[dict[str, torch.Tensor]] = []

    def select() -> None:
        masks[:] = [select_top_k(scores, k, seed=0).masks]

    record.measure("full_select", f"select_top_k keep {keep}", select, repeats=1, k=k)
    return masks[0]


def shard_one_rank(args: argparse.Namespace, model: nn.Module) -> None:
    """`fully_shard` every LoRA factor and DoRA magnitude (each a group of its own, as Axolotl
    does), every decoder layer and the root onto `args.device`, on a 1-rank mesh of this
    process (its process group made on first use)."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
    mesh = init_device_mesh(args.device.split(":")[0], (1,))
    lora_parts = [
        part
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
        for parts in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
        for part in parts.values()
    ]
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for module in lora_parts + layers:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def fisher_lora_fsdp2(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    """The LoRA Fisher pass on the model FSDP2 has sharded (a 1-rank mesh: the model built on
    the CPU, as Axolotl loads an FSDP model, then moved by `fully_shard`), as the plugin scores
    under FSDP2, against the same pass on the unsharded model; the two masks at the first
    `--keep` must be equal."""
    batches = random_batches(args, SHAPES[shape][1]["vocab_size"], args.samples)
    n = args.samples
    keep = args.keep[0]
    masks = {}
    for name in ("unsharded", "FSDP2 1 rank"):
        sharded = name != "unsharded"
        model = add_lora(
            random_model(shape, "cpu" if sharded else args.device), 16, "cpu", args.dora
        )
        if not sharded:
            model.to(args.device)
        params = adapter_parameters(model)
        names = names_of(model, params)
        if sharded:
            shard_one_rank(args, model)
            params = parameters_by_name(model, names)
        entries = sum(p.numel() for p in params.values())
        scores: dict[str, torch.Tensor] = {}

        def run(
            model: nn.Module = model,
            params: dict[str, nn.Parameter] = params,
            into: dict[str, torch.Tensor] = scores,
        ) -> None:
            into.update(fisher_scores(model, batches, params, n, progress=False).scores)

        record.measure("fisher_lora_fsdp2", name, run, examples=n, entries=entries)
        masks[name] = select_top_k(scores, round(keep * entries), seed=0).masks
        del model, params, run
        free()
    for key, mask in masks["unsharded"].items():
        if not torch.equal(mask.cpu(), masks["FSDP2 1 rank"][key].cpu()):
            raise AssertionError(f"{key}: the sharded pass selected other entries")


def fsdp2(args: argparse.Namespace, shape: str, record: Recorder) -> None:
    """Full-parameter value vectors under FSDP2 in this one process (a 1-rank mesh): the model
    is built on the CPU, as Axolotl loads an FSDP model, its value vectors are made there, and
    `fully_shard` moves all of it to the device, as the plugin's run does; against the same
    sparse training without FSDP2. Every masked entry is checked unchanged afterwards."""
    keep = args.keep[0]
    batch = random_batches(args, SHAPES[shape][1]["vocab_size"], args.micro_batch)[0]
    model = random_model(shape, "cpu")
    params = model_parameters(model)
    generator = torch.Generator().manual_seed(0)
    masks = {key: torch.rand(p.shape, generator=generator) < keep for key, p in params.items()}
    plain = full_mode.Variant("sparse", random_model(shape, args.device), masks)
    measure_steps(record, "fsdp2_step", f"sparse keep {keep}", plain, batch)
    del plain
    free()
    frozen = {key: p.detach()[~masks[key]].clone() for key, p in list(params.items())[:4]}
    variant = full_mode.Variant("sparse", model, masks)  # value vectors before sharding
    shard_one_rank(args, model)
    variant.trainable = [p for p in model.parameters() if p.requires_grad]  # the sharded ones
    variant.optimizer = torch.optim.AdamW(variant.trainable, lr=1e-5, weight_decay=0.01)
    measure_steps(record, "fsdp2_step", f"sparse keep {keep}, FSDP2 1 rank", variant, batch)
    state = dict(model.named_parameters())
    for key, before in frozen.items():
        after = state[key].full_tensor().cpu()[~masks[key]]
        if not torch.equal(after, before):
            raise AssertionError(f"{key}: a masked entry moved under FSDP2")


SECTIONS = {
    "fisher_lora": fisher_lora,
    "lora_step": lora_step,
    "full_fisher": full_fisher,
    "full": full,
    "fsdp2": fsdp2,
    "fisher_lora_fsdp2": fisher_lora_fsdp2,
}
TABLES = [
    ("fisher_lora", "s per pass", "limit"),
    ("lora_step", "s per step", "plain"),
    ("full_fisher", "s per pass", "forward_backward"),
    ("full_select", "s", None),
    ("full_step", "s per step", "frozen"),
    ("fsdp2_step", "s per step", None),
    ("fisher_lora_fsdp2", "s per pass", "unsharded"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS))
    add_batch_args(parser, seq=512, answer=64)
    parser.add_argument("--samples", type=int, default=32, help="examples in the LoRA Fisher pass")
    parser.add_argument("--dora", action="store_true", help="DoRA in the LoRA Fisher sections")
    parser.add_argument("--keep", type=float, action="append", help="default: 0.005 and 0.02")
    parser.add_argument("--fisher-chunks", type=int, default=4, help="full_fisher's chunked pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after a warm-up")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after a warm-up")
    parser.add_argument("--out", type=Path, help="append each result here as a JSON line")
    args = parser.parse_args()
    args.keep = args.keep or [0.005, 0.02]
    print(machine(), flush=True)
    for shape in args.shape:
        record = Recorder(args, shape)
        for section in args.section or SECTIONS:
            SECTIONS[section](args, shape, record)
            free()
        print(f"\n{shape}, micro-batch {args.micro_batch} x {args.seq} tokens\n")
        for section, unit, baseline in TABLES:
            if any(row["section"] == section for row in record.rows):
                print(record.table(section, unit, baseline))
                print()


if __name__ == "__main__":
    main()
