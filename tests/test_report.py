"""What `fish-mask inspect` and `diff` compute: fractions per layer/module/matrix, overlaps,
and the heatmap grid."""

from __future__ import annotations

import math
import re

import pytest
import torch

from axolotl_fish.adapters.tensors import layer_index
from axolotl_fish.masks.file import FishMask
from axolotl_fish.reports.heatmap import heatmap_grid, save_heatmap
from axolotl_fish.reports.summary import layer, selected_fractions
from axolotl_fish.reports.text import diff_report, inspect_report, overlaps

PREFIX = "base_model.model.model"


def key(layer_no: int, module: str, matrix: str) -> str:
    return f"{PREFIX}.layers.{layer_no}.self_attn.{module}.{matrix}.weight"


def first(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A mask whose first n entries (row-major) are selected."""
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[:n] = True
    return flat.reshape(shape)


@pytest.fixture
def mask() -> FishMask:
    """Layers 2 and 10 (to check natural order), q_proj and v_proj; an embedding factor."""
    masks = {
        key(2, "q_proj", "lora_A"): first(4, (2, 4)),  # 4 of 8
        key(2, "q_proj", "lora_B"): first(0, (4, 2)),  # 0 of 8
        key(10, "q_proj", "lora_A"): first(8, (2, 4)),  # 8 of 8
        key(10, "v_proj", "lora_B"): first(2, (4, 2)),  # 2 of 8
        f"{PREFIX}.embed_tokens.lora_embedding_A": first(1, (2, 2)),  # 1 of 4
    }
    return FishMask(masks, {"strategy": "fisher", "seed": 42})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (key(3, "q_proj", "lora_A"), 3),
        ("base_model.model.transformer.h.11.attn.c_attn.lora_B.weight", 11),
        (f"{PREFIX}.embed_tokens.lora_embedding_A", None),
        ("base_model.model.lm_head.modules_to_save.weight", None),
    ],
)
def test_layer_index(name, expected):
    assert layer_index(name) == expected


def test_fractions_per_layer_in_natural_order(mask):
    assert selected_fractions(mask.masks, layer) == {
        "2": (4, 16),
        "10": (10, 16),
        "other": (1, 4),
    }


def test_inspect_report_lists_k_metadata_and_groups(mask):
    text = inspect_report(mask, "m.safetensors")
    assert "k = 15 of 36 entries selected (41.67%) in 5 tensors" in text
    assert "  seed      42" in text and '  strategy  "fisher"' in text
    lines = text.splitlines()
    layers = lines.index("selected per layer:")
    assert [line.split()[0] for line in lines[layers + 1 : layers + 4]] == ["2", "10", "other"]
    assert re.search(r"\n  q_proj +12 / +24 +50\.00%\n", text)
    assert re.search(r"\n  lora_embedding_A +1 / +4 +25\.00%$", text)
    assert "selected per tensor:" not in text
    assert "selected per tensor:" in inspect_report(mask, "m", per_tensor=True)


def test_overlap_counts_and_jaccard():
    a = FishMask({"x.lora_A.weight": first(4, (10,))})
    b = FishMask({"x.lora_A.weight": first(6, (10,)).roll(2)})  # entries 2..7
    whole = overlaps(a, b)["all"]
    assert (whole.a, whole.b, whole.both, whole.total) == (4, 6, 2, 10)
    assert whole.jaccard == pytest.approx(2 / 8)
    assert whole.expected_by_chance == pytest.approx(4 * 6 / 10)
    report = diff_report(a, b, "A.st", "B.st")
    assert "Jaccard            0.2500" in report and "in both            2 " in report


def test_identical_masks_have_jaccard_one_and_same_metadata(mask):
    report = diff_report(mask, mask, "a", "a")
    assert "Jaccard            1.0000" in report and "metadata: the same" in report


def test_diff_names_differing_metadata(mask):
    other = FishMask(mask.masks, {"strategy": "random", "seed": 42})
    assert 'strategy: A "fisher", B "random"' in diff_report(mask, other, "a", "b")


def test_overlap_of_masks_over_other_tensors_names_the_tensor(mask):
    extra = FishMask({**mask.masks, "y.lora_B.weight": first(1, (2,))})
    with pytest.raises(ValueError, match=r"'y\.lora_B\.weight' is only in mask B"):
        overlaps(mask, extra)
    name = key(2, "q_proj", "lora_A")
    reshaped = FishMask({**mask.masks, name: first(4, (4, 2))})
    with pytest.raises(ValueError, match=r"shape \(2, 4\) in mask A and \(4, 2\) in mask B"):
        overlaps(mask, reshaped)


def test_heatmap_grid_and_png(mask, tmp_path):
    rows, cols, grid = heatmap_grid(mask)
    assert rows == ["2", "10", "other"] and cols == ["embed_tokens", "q_proj", "v_proj"]
    expected = [[math.nan, 0.25, math.nan], [math.nan, 1.0, 0.25], [0.25, math.nan, math.nan]]
    assert torch.allclose(torch.from_numpy(grid), torch.tensor(expected).double(), equal_nan=True)
    path = save_heatmap(mask, tmp_path / "m.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary file left
