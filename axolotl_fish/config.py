"""The `fish_mask:` settings, validated once and shared by the core and the Axolotl plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Strategy = Literal["fisher", "random", "reverse"]
FisherKind = Literal["empirical", "sampled"]


class FishMaskConfig(BaseModel):
    """How many adapter entries stay trainable and how they are chosen.

    `fisher` keeps the entries with the largest empirical Fisher information (the paper);
    `random` and `reverse` (the least important entries) are the paper's ablations at the same k.
    """

    model_config = ConfigDict(extra="forbid")

    keep_ratio: float = Field(
        gt=0.0, le=1.0, description="Fraction of the adapter's entries that stay trainable."
    )
    num_samples: int = Field(
        default=1024, ge=1, description="Training examples used to estimate the Fisher information."
    )
    strategy: Strategy = Field(default="fisher", description="How entries are ranked.")
    fisher: FisherKind = Field(
        default="empirical",
        description="`empirical`: gradients at the data's labels (the paper); `sampled`: at labels "
        "drawn from the model's own predictive distribution (the true Fisher).",
    )
    seed: int = Field(
        default=42, description="Seeds tie-breaking and the `random` strategy; same on every rank."
    )
    mask_path: str | None = Field(
        default=None, description="Reuse a saved fish_mask.safetensors instead of computing one."
    )
