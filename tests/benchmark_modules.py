"""The benchmark scripts' modules, for tests (`benchmarks/` is a folder of scripts that import
each other by bare name, not a package)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmarks_importable() -> Iterator[None]:
    """Within the context, `import quality` and its siblings find `benchmarks/`."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))
