"""The package's import rule: rooms (sub-packages) on floors, imports only downward.

A module may import its own room and any room on a lower floor - never a room on its own floor
or above. Rooms below `integration` never import Axolotl. The same table is in
docs/development.md and the package docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_fish"

FLOORS: dict[str, int] = {
    "base": 1,
    "config": 1,
    "adapters": 2,
    "fisher": 2,
    "masks": 3,
    "scorers": 3,
    "training": 4,
    "reports": 4,
    "pipeline": 5,
    "distributed": 5,
    "integration": 6,
    "compare": 7,
    "demo": 7,
    "cli": 8,  # registers the compare room's command
    "__init__": 9,
    "__main__": 9,
}
AXOLOTL_FLOOR = FLOORS["integration"]


def room_of(module: str) -> str:
    """`axolotl_fish.masks.file` -> `masks`; `axolotl_fish` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """Every absolute module name `source` imports (lazy and TYPE_CHECKING imports included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from axolotl_fish import masks` imports the room `masks`
            if name == "axolotl_fish":
                found += [(node.lineno, f"axolotl_fish.{a.name}") for a in node.names]
    return found


def violations(path: str, module: str, source: str) -> list[str]:
    here = room_of(module)
    floor = FLOORS[here]
    bad = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top == "axolotl" and floor < AXOLOTL_FLOOR:
            bad.append(f"{path}:{line} imports {name}: room `{here}` (floor {floor}) is core")
        if top != "axolotl_fish" or name == "axolotl_fish":
            continue
        there = room_of(name)
        if there not in FLOORS:
            bad.append(f"{path}:{line} imports {name}: room `{there}` is not in FLOORS")
        elif there != here and FLOORS[there] >= floor:
            bad.append(
                f"{path}:{line} imports {name}: room `{here}` (floor {floor}) may not import "
                f"`{there}` (floor {FLOORS[there]})"
            )
    return bad


def package_modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
        out.append((path, ".".join(parts).removesuffix(".__init__")))
    return out


def test_every_module_belongs_to_a_room() -> None:
    rooms = {room_of(module) for _, module in package_modules()}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


def test_imports_only_go_down() -> None:
    bad = []
    for path, module in package_modules():
        bad += violations(str(path.relative_to(PACKAGE.parent)), module, path.read_text())
    assert not bad, "import rule broken:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "axolotl_fish.training.callback",
            "from axolotl_fish.reports.summary import x",
            "`reports`",
        ),
        ("axolotl_fish.masks.file", "import axolotl.cli", "is core"),
        (
            "axolotl_fish.fisher.rules",
            "def f():\n    from axolotl_fish.masks import file",
            "`masks`",
        ),
        ("axolotl_fish.base.ranks", "from ..training import masking", "`training`"),
        (
            "axolotl_fish.pipeline.compute",
            "from axolotl_fish.distributed import x",
            "`distributed`",
        ),
    ],
)
def test_rule_names_the_offending_import(module: str, source: str, expected: str) -> None:
    bad = violations("x.py", module, source)
    assert len(bad) == 1 and expected in bad[0], bad


def test_allowed_imports_pass() -> None:
    source = (
        "from axolotl_fish.masks.file import FishMask\nfrom axolotl_fish.training import masking"
    )
    assert violations("x.py", "axolotl_fish.training.callback", source) == []
