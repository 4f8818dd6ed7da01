"""The `fish_mask:` settings, validated once and shared by the core and the Axolotl plugin."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from huggingface_hub import HfUri, parse_hf_uri
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FisherKind = Literal["empirical", "sampled"]
Scope = Literal["global", "per_tensor", "per_matrix"]
BUDGET_KEYS = ("keep_ratio", "keep_params", "match_rank")
HUB_PREFIX = "hf://"
# Seeds of torch.Generator are 64-bit; the sampled-label draws add (example index << 32).
MAX_SEED = 2**32 - 1


def check_patterns(patterns: Sequence[str]) -> None:
    """Raise ValueError unless every pattern is a valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from err


def check_hub_reference(reference: str) -> HfUri:
    """The parts of a Hub reference `hf://[<TYPE>/]<ORG>/<NAME>[@<REVISION>][/<PATH>]`
    (huggingface_hub's syntax), refusing buckets and `..` in the revision or the path."""
    uri = parse_hf_uri(reference)  # HfUriError (a ValueError) names what is malformed
    if uri.is_bucket:
        raise ValueError(f"{reference}: a FISH mask is read from a repository, not a bucket.")
    for part, value in (("revision", uri.revision or ""), ("path", uri.path_in_repo)):
        if ".." in value.split("/"):
            raise ValueError(f"{reference}: the {part} {value!r} contains '..'.")
    return uri


class FishMaskConfig(BaseModel):
    """How many adapter entries stay trainable and how they are chosen.

    `strategy` names a scorer (axolotl_fish.scorers): `fisher` keeps the entries with the largest
    empirical Fisher information (the paper); `random` and `reverse` (the least important
    entries) are the paper's ablations at the same k; installed packages can add more. The
    name is checked against the installed scorers (`axolotl_fish.scorers.check_strategy`) by
    `compute_fish_mask` before any work and by the Axolotl schema at config validation: the
    settings themselves do not depend on the scorer registry (which depends on them).
    """

    model_config = ConfigDict(extra="forbid")

    keep_ratio: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Fraction of the candidate entries that train."
    )
    keep_params: int | None = Field(
        default=None, ge=1, description="Absolute number of candidate entries that train."
    )
    match_rank: int | None = Field(
        default=None,
        ge=1,
        description="Train as many entries as the same adapter has at this rank (equal budget).",
    )
    scope: Scope = Field(
        default="global",
        description="`global`: one ranking over all entries (the paper); `per_tensor`: every "
        "tensor keeps the same fraction; `per_matrix`: A-like and B-like factors get budgets "
        "proportional to their sizes.",
    )
    num_samples: int = Field(
        default=1024, ge=1, description="Training examples used to estimate the Fisher information."
    )
    strategy: str = Field(
        default="fisher", description="The scorer that ranks entries (axolotl_fish.scorers)."
    )
    fisher: FisherKind = Field(
        default="empirical",
        description="`empirical`: gradients at the data's labels (the paper); `sampled`: at labels "
        "drawn from the model's own predictive distribution (the true Fisher).",
    )
    fisher_chunks: int = Field(
        default=1,
        ge=1,
        description="Score the candidates in this many groups of tensors, one Fisher pass over the "
        "same examples each: the device holds one group's fp32 scores at a time (the rest wait "
        "in CPU memory), for models whose scores do not fit beside them.",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Dense training steps before the Fisher pass (not part of the run's schedule), "
        "so lora_A gets real scores although lora_B starts at 0.",
    )
    restore_after_warmup: bool = Field(
        default=True,
        description="After the pass, put the adapter back to its initial values, so only the k "
        "selected entries ever differ from initialisation.",
    )
    score_after_sharding: bool | None = Field(
        default=None,
        description="Under FSDP2 with an adapter: compute the mask when training starts, on the "
        "sharded model, so that no device must hold the whole model. Unset: whenever the run "
        "allows it (built-in strategy, no warm-up, every candidate scored by a batched rule: "
        "not layers with their own forward, e.g. llama-adapter's); false: score before "
        "sharding, with the whole model on one device.",
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=MAX_SEED,
        description="Seeds tie-breaking and the `random` strategy; same on every rank.",
    )
    mask_path: str | None = Field(
        default=None,
        description="Reuse a saved fish_mask.safetensors instead of computing one: a file, a "
        "folder holding one, or a Hub reference hf://org/name[@revision][/path] "
        "(axolotl_fish.masks.source).",
    )
    include: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Regexes (re.search) over saved tensor names: only trainable tensors that "
        "match one are candidates for the mask; the others train densely, outside k.",
    )
    exclude: list[str] | None = Field(
        default=None,
        description="Regexes over saved tensor names: matching trainable tensors are not "
        "candidates and train densely, outside k.",
    )

    @field_validator("include", "exclude")
    @classmethod
    def valid_patterns(cls, patterns: list[str] | None) -> list[str] | None:
        check_patterns(patterns or ())
        return patterns

    @field_validator("mask_path")
    @classmethod
    def usable_mask_path(cls, mask_path: str | None) -> str | None:
        if mask_path is not None and not mask_path.strip():
            raise ValueError("is empty: name a mask file, a folder holding one, or hf://org/name")
        if mask_path is not None and mask_path.startswith(HUB_PREFIX):
            check_hub_reference(mask_path)
        return mask_path

    @model_validator(mode="after")
    def one_budget(self) -> FishMaskConfig:
        given = [key for key in BUDGET_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of fish_mask.keep_ratio, fish_mask.keep_params, "
                f"fish_mask.match_rank (got {', '.join(given) or 'none'})"
            )
        return self
