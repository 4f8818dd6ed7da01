"""The quality protocol's methods and comparisons, as data.

A method is a name plus a fragment of an ordinary Axolotl config that is merged into the run's
config (`fish_mask` key by key, everything else replaced), so a new kind of adapter is a few
lines here, e.g.

    Method("adapter bottleneck 64", {"adapter": "bottleneck", ..., "fish_mask": None}, tier=2)

(`fish_mask: None` drops the plugin). Every LoRA row sets `lora_r`; `lora_alpha` follows as 2r.
Dense LoRA carries the plugin at `keep_ratio: 1.0, strategy: random` (every entry trains, no
Fisher pass) only so that its adapter initialisation is seeded like the masked runs'.

Tiers order the sweep: tier 1 answers the main questions (masked 2r vs dense r, Fisher vs
random), tier 2 the baselines a reviewer asks for next, tier 3 the budgets LoRA cannot express,
tier 4 the paper's Adapter rows (dense bottleneck size s vs 2s masked to s: fisher, random,
reverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axolotl_fish.compare.stats import Difference

DENSE = {"keep_ratio": 1.0, "strategy": "random"}
ADAPTER_SIZE = 16  # the paper's Adapter rows: dense size s vs 2s masked to s
LR_WARMUP_STEPS = 10  # fixed, so a run of S steps is the first S steps of a longer one


@dataclass(frozen=True)
class Method:
    name: str
    config: dict[str, Any]
    tier: int
    # The mask must select exactly these factor kinds (checked on the saved mask): LoRA-FA.
    only_factor: str | None = None
    notes: str = ""
    lrs: tuple[float, ...] = field(default=())  # the starting grid; empty: the protocol's
    # A dense baseline of another family than the curve's: its own curve at its chosen LR.
    check_plateau: bool = False

    @property
    def dense(self) -> bool:
        return (self.config.get("fish_mask") or {}).get("keep_ratio") == 1.0


@dataclass(frozen=True)
class LoraShapes:
    """Sum of in_features (|A| per rank) and of out_features (|B| per rank) over the targets."""

    a_per_rank: int
    b_per_rank: int

    def entries(self, rank: int) -> int:
        return rank * (self.a_per_rank + self.b_per_rank)


def lora_shapes(model_path: Path, targets: list[str]) -> LoraShapes:
    """Read the target modules' shapes from a meta-device copy of the model (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets
    ]
    if not linear:
        raise ValueError(f"no Linear module named any of {targets} in {model_path}")
    return LoraShapes(sum(m.in_features for m in linear), sum(m.out_features for m in linear))


def lora(rank: int, **fish_mask: Any) -> dict[str, Any]:
    return {"adapter": "lora", "lora_r": rank, "fish_mask": fish_mask or DENSE}


def bottleneck(size: int, **fish_mask: Any) -> dict[str, Any]:
    """Houlsby bottleneck adapters of this size (Adapter-FISH, `adapter: bottleneck`)."""
    settings = {"placement": "houlsby", "size": size, "nonlinearity": "relu"}
    return {"adapter": "bottleneck", "bottleneck": settings, "fish_mask": fish_mask or DENSE}


def method_table(r: int, shapes: LoraShapes, warmup: int) -> list[Method]:
    """Every method at the budget of dense LoRA rank r, plus the budgets below rank 1."""
    fa_rank = round(shapes.entries(r) / shapes.b_per_rank)
    tiny = [(0.02, "2%"), (0.005, "0.5%")]
    s = ADAPTER_SIZE
    adapter_rows = [
        Method(
            f"dense Adapter s{s}",
            bottleneck(s),
            4,
            notes="the paper's Adapter baseline",
            check_plateau=True,
        ),
        *[
            Method(
                f"{strategy} Adapter s{2 * s}->s{s}",
                bottleneck(2 * s, match_rank=s, strategy=strategy),
                4,
                notes="match_rank counts the bottleneck size: exactly dense size s's entries",
            )
            for strategy in ("fisher", "random", "reverse")
        ],
    ]
    return [
        Method(f"dense LoRA r{r}", lora(r), 1, notes="the baseline"),
        Method(f"fisher r{2 * r}->r{r}", lora(2 * r, match_rank=r, strategy="fisher"), 1),
        Method(f"random r{2 * r}->r{r}", lora(2 * r, match_rank=r, strategy="random"), 1),
        Method(
            f"fisher r{2 * r}->r{r}, warm-up {warmup}+restore",
            lora(2 * r, match_rank=r, strategy="fisher", warmup_steps=warmup),
            1,
            notes="the zero-B remedy: dense warm-up, Fisher pass, adapter restored to its init",
        ),
        Method(
            f"LoRA-FA r{fa_rank}",
            lora(fa_rank, keep_params=fa_rank * shapes.b_per_rank, strategy="fisher"),
            2,
            only_factor="lora_B",
            notes=(
                f"A frozen at init, all of B trains: rank {fa_rank}'s B has "
                f"{fa_rank * shapes.b_per_rank:,} entries (dense r{r}: {shapes.entries(r):,}); "
                "a Fisher mask at init with k = that count selects exactly every lora_B entry "
                "(every lora_A score is 0 while B = 0), checked on the saved mask"
            ),
        ),
        Method(
            f"fisher r{2 * r}->r{r}, per_matrix",
            lora(2 * r, match_rank=r, strategy="fisher", scope="per_matrix"),
            2,
        ),
        Method(f"fisher r{4 * r}->r{r}", lora(4 * r, match_rank=r, strategy="fisher"), 2),
        Method(f"random r{4 * r}->r{r}", lora(4 * r, match_rank=r, strategy="random"), 2),
        Method("dense LoRA r1", lora(1), 3, notes="the smallest dense LoRA"),
        *[
            Method(f"{strategy} r{r} keep {label}", lora(r, keep_ratio=ratio, strategy=strategy), 3)
            for ratio, label in tiny
            for strategy in ("fisher", "random")
        ],
        Method(f"reverse r{2 * r}->r{r}", lora(2 * r, match_rank=r, strategy="reverse"), 3),
        Method(
            f"fisher r{2 * r}->r{r}, warm-up {warmup} kept",
            lora(
                2 * r,
                match_rank=r,
                strategy="fisher",
                warmup_steps=warmup,
                restore_after_warmup=False,
            ),
            3,
            notes="restore_after_warmup: false - not an equal budget (every entry moved during "
            "the warm-up); for the restore_after_warmup default only",
        ),
        *adapter_rows,
    ]


@dataclass(frozen=True)
class DefaultQuestion:
    """A plugin default the protocol settles: the paper's value against one alternative, each
    run as a method of the table. The rule (docs/benchmarks.md, written 2026-11-29 23:15 UTC
    before the runs that decide it): the alternative replaces the paper's value only if it beats
    it on at least one task and is worse on none; one that is not an equal budget
    (`everywhere`) has to beat it on every task. Nothing is decided before every planned seed
    of both methods is in on every task - except that an `everywhere` alternative that does
    not beat the paper's value on one task with every seed in can no longer win."""

    key: str
    paper: str  # the paper's value, as written in the YAML
    alternative: str
    paper_method: str
    alternative_method: str
    everywhere: bool = False

    @property
    def question(self) -> str:
        return f"default {self.key}: {self.alternative} vs {self.paper}"

    def decide(self, diffs: dict[str, Difference | None], planned: int) -> str:
        """diffs: per task, alternative - paper (None: not run yet)."""
        waiting = [
            f"{task} {'not run yet' if d is None else f'{d.seeds} of {planned} seeds'}"
            for task, d in diffs.items()
            if d is None or not d.complete(planned)
        ]
        lost = [  # with `everywhere`, one complete task it does not beat on settles it
            task
            for task, d in diffs.items()
            if self.everywhere and d is not None and d.complete(planned) and not d.beats
        ]
        if waiting and lost:
            return (
                f"`{self.paper}` stays: the alternative does not beat it on {', '.join(lost)} "
                f"(every planned seed in) and must beat it on every task ({', '.join(waiting)}: "
                f"run as registered, cannot change this)"
            )
        if waiting:
            return f"undecided ({', '.join(waiting)}); `{self.paper}` stays meanwhile"
        beats = [task for task, d in diffs.items() if d is not None and d.beats]
        worse = [task for task, d in diffs.items() if d is not None and d.worse]
        wins = len(beats) == len(diffs) if self.everywhere else bool(beats) and not worse
        if wins:
            return (
                f"`{self.alternative}` replaces `{self.paper}`: it beats it on {', '.join(beats)}"
            )
        needed = "beat it on every task" if self.everywhere else "beat it on one and lose on none"
        found = (
            f"beats it on {', '.join(beats) or 'no task'}, is worse on {', '.join(worse) or 'none'}"
        )
        return f"`{self.paper}` stays: the alternative {found} (it must {needed})"


def default_questions(r: int, warmup: int) -> list[DefaultQuestion]:
    warm = f"fisher r{2 * r}->r{r}, warm-up {warmup}+restore"
    at_init = f"fisher r{2 * r}->r{r}"
    return [
        DefaultQuestion("warmup_steps", "0", str(warmup), at_init, warm),
        DefaultQuestion("scope", "global", "per_matrix", at_init, f"{at_init}, per_matrix"),
        DefaultQuestion(
            "restore_after_warmup",
            "true",
            "false",
            warm,
            f"{at_init}, warm-up {warmup} kept",
            everywhere=True,
        ),
    ]


def comparisons(table: list[Method], r: int, warmup: int) -> list[tuple[str, str, str]]:
    """(method, against, question) pairs that get a paired bootstrap interval, besides every
    method against dense LoRA r (the first method)."""
    warm = f"fisher r{2 * r}->r{r}, warm-up {warmup}+restore"
    fa = next((m.name for m in table if m.only_factor == "lora_B"), "LoRA-FA (not in the table)")
    fisher_vs_random = [
        (f"fisher r{2 * r}->r{r}", f"random r{2 * r}->r{r}"),
        # random's mask ignores the warm-up and restore puts every entry back: the random r2r
        # run is the warm-up row's equal-k random control.
        (warm, f"random r{2 * r}->r{r}"),
        (f"fisher r{4 * r}->r{r}", f"random r{4 * r}->r{r}"),
        (f"fisher r{r} keep 2%", f"random r{r} keep 2%"),
        (f"fisher r{r} keep 0.5%", f"random r{r} keep 0.5%"),
    ]
    # reverse trains the lowest-scored entries: if it does as well as fisher, the ranking
    # carries nothing the training can use.
    fisher_vs_reverse = [
        (f"fisher r{2 * r}->r{r}", f"reverse r{2 * r}->r{r}"),
        (
            f"fisher Adapter s{2 * ADAPTER_SIZE}->s{ADAPTER_SIZE}",
            f"reverse Adapter s{2 * ADAPTER_SIZE}->s{ADAPTER_SIZE}",
        ),
    ]
    return [
        *[(a, b, "Fisher vs random selection, same k") for a, b in fisher_vs_random],
        *[(a, b, "Fisher vs reverse selection, same k") for a, b in fisher_vs_reverse],
        (f"fisher r{2 * r}->r{r}", fa, "fisher at init vs LoRA-FA"),
        *[(q.alternative_method, q.paper_method, q.question) for q in default_questions(r, warmup)],
        (
            f"fisher Adapter s{2 * ADAPTER_SIZE}->s{ADAPTER_SIZE}",
            f"dense Adapter s{ADAPTER_SIZE}",
            "Adapter-FISH vs dense Adapter, same entries",
        ),
        (
            f"fisher Adapter s{2 * ADAPTER_SIZE}->s{ADAPTER_SIZE}",
            f"random Adapter s{2 * ADAPTER_SIZE}->s{ADAPTER_SIZE}",
            "Fisher vs random selection, same k",
        ),
        *[
            (f"{selection} r{r} keep {share}", "dense LoRA r1", "below rank 1 vs dense r1")
            for selection in ("fisher", "random")
            for share in ("2%", "0.5%")
        ],
    ]
