"""Dense warm-up before the Fisher pass: the remedy for LoRA's zero-initialised B.

With B = 0 every lora_A gradient, hence every lora_A Fisher score, is exactly 0 and the mask's
A part is decided by ties. A few dense steps make B non-zero so A gets real scores. With
`restore` the adapter is then put back to its initial values, so only the k selected entries
ever differ from initialisation and the budget stays honest.

The warm-up is its own short loop (AdamW at the run's learning rate, on the first micro-batches
of the training data); it is not part of the run's schedule, and every random generator is
left as it was, so the run itself trains exactly as it would without it. Under DDP-like
processes each rank reads its own micro-batches and the gradients are averaged over ranks; on a
model FSDP2 has sharded it steps the slices, FSDP2 averaging their gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from axolotl_fish.base.ranks import any_rank, average_gradients
from axolotl_fish.base.rng import preserved_rng_state

LOG = logging.getLogger(__name__)


def dense_warmup(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, nn.Parameter],
    steps: int,
    learning_rate: float,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Train `params` densely for `steps` micro-batches; return their values from before."""
    initial = {key: p.detach().clone() for key, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rate, weight_decay=0.0)
    device = next(iter(params.values())).device
    was_training = model.training
    model.train()
    done = 0
    batches = iter(batches)
    with preserved_rng_state():
        for _ in tqdm(range(steps), desc="Dense warm-up", disable=not progress):
            raw_batch = next(batches, None)
            # Every rank steps together (FSDP2 gathers in each forward, the gradients are
            # averaged): all stop when one runs out of data.
            if any_rank(raw_batch is None, device):
                break
            batch = {k: v.to(device) for k, v in raw_batch.items()}
            model(**batch, use_cache=False).loss.backward()
            average_gradients(params.values())  # ranks stay identical, as under DDP
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
    model.train(was_training)
    if done < steps:
        LOG.warning(f"Dense warm-up: the data ran out after {done} of {steps} steps.")
    return initial


@torch.no_grad()
def restore(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    """Put every tensor back to the given values."""
    for key, param in params.items():
        param.copy_(values[key])
