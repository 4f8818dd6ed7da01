"""Leave every random stream exactly as it was, so a side pass does not change training."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Snapshot Python, NumPy, torch CPU and CUDA generators and restore them on exit.

    Iterating a shuffled DataLoader draws its seed from torch's global generator; without this
    the Fisher pass would change the order of the training data.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
