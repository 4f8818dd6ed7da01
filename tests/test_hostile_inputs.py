"""The catalogue of hostile files and references: every bad mask, delta, model folder, output
folder, Hub reference and config value a user (or someone handing over a file) can supply, each
refused with one `Error:` line that names the file or field, and nothing changed on disk.

`CASES` feeds `axolotl fish-mask ...` (in process); `CONFIG_CASES` goes through Axolotl's own
config validation. Below them: the inputs that must work (empty masks, a Mistral-style model
folder) and the places a mask's metadata reaches (the plugin's loader, the model card).
(Unreadable, pickled, wrong-dtype masks: test_cli.py; malformed `hf://` syntax: test_mask_source.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from markdown_it import MarkdownIt
from safetensors.torch import load_file, save_file
from test_cli import Q, invoke, saved_mask
from test_plugin_config import make_cfg, validated  # noqa: F401 (a fixture)
from tiny_peft import tiny_lora_model

from axolotl_fish.base.safetensors_io import json_metadata
from axolotl_fish.integration import _load_mask
from axolotl_fish.masks.file import FishMask
from axolotl_fish.pipeline.provenance import check_mask_fits
from axolotl_fish.reports.model_card import card_section
from axolotl_fish.training.delta import DELTA_FILENAME, weights_digest

BASE_WEIGHTS = {"w": torch.arange(16.0).reshape(4, 4), "b": torch.full((4,), 0.5)}
# A delta moving entries 1 and 5 of `w` and `b` whole; forged variants change one thing.
GOOD_DELTA = {
    "w.indices": torch.tensor([1, 5], dtype=torch.int32),
    "w.values": torch.tensor([-1.0, -5.0]),
    "b.values": torch.zeros(4),
}
DELTA_METADATA = {
    "base_model": "tiny",
    "base_sha256": weights_digest(BASE_WEIGHTS),
    "dtypes": {"w": "float32", "b": "float32"},
    "k": 2,
}


def forge_delta(path: Path, changes: dict, metadata: dict | None = None) -> Path:
    """A delta with `changes` to the good one's tensors (None removes one) and its checksum
    recomputed, as someone handing over a forged file would."""
    tensors = {k: v for k, v in (GOOD_DELTA | changes).items() if v is not None}
    meta = (DELTA_METADATA if metadata is None else metadata) | {
        "delta_sha256": weights_digest(tensors)
    }
    save_file(tensors, path, json_metadata(meta))
    return path


def base_folder(folder: Path, index: dict | None = None) -> Path:
    """A model folder: config.json and model.safetensors, or shards listed by `index`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    if index is None:
        save_file(BASE_WEIGHTS, folder / "model.safetensors", {"format": "pt"})
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def masked(path: Path, **metadata) -> Path:
    """A mask file whose metadata holds `metadata` (saved as is: `save` does not check)."""
    masks = {Q.format(0, m): torch.ones(4, 4, dtype=torch.bool) for m in "AB"}
    return FishMask(masks, {"strategy": "fisher", **metadata}).save(path)


def masked_empty(path: Path) -> Path:
    return FishMask({}, {"strategy": "fisher"}).save(path)


def apply_args(d: Path, out: Path | str, delta: dict | None = None, meta: dict | None = None):
    base = d / "base" if (d / "base").exists() else base_folder(d / "base")
    return ["apply", base, forge_delta(d / DELTA_FILENAME, delta or {}, meta), out]


def symlinked_base(d: Path) -> Path:
    base_folder(d / "base")
    (d / "link").symlink_to(d / "base", target_is_directory=True)
    return d / "link"


def stale_out(d: Path) -> Path:
    (d / "out").mkdir()
    save_file({"x": torch.zeros(1)}, d / "out" / "model-00001-of-00002.safetensors")
    (d / "out" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return d / "out"


def indexed_base(d: Path, index: dict | str) -> Path:
    folder = base_folder(d / "base", index if isinstance(index, dict) else {})
    if isinstance(index, str):
        (folder / "model.safetensors.index.json").write_text(index)
    return folder


def empty_folder(folder: Path) -> Path:
    folder.mkdir()
    return folder


OWN = "is the base model's folder"
Case = tuple[str, Callable[[Path], tuple[list, str]]]
CASES: list[Case] = [
    # 1. apply never writes into the base model's folder, however OUT_DIR names it
    ("apply-out-is-base", lambda d: (apply_args(d, d / "base"), OWN)),
    ("apply-out-dotdot", lambda d: (apply_args(d, d / "base" / ".." / "base"), OWN)),
    ("apply-out-symlink", lambda d: (apply_args(d, symlinked_base(d)), OWN)),
    ("apply-out-inside-base", lambda d: (apply_args(d, d / "base" / "rebuilt"), OWN)),
    # 2. ... nor beside other files
    ("apply-out-not-empty", lambda d: (apply_args(d, stale_out(d)), "not an empty folder")),
    # 3. the base's weights are what its index lists, in files inside the folder
    (
        "base-index-escapes",
        lambda d: (
            apply_args(indexed_base(d, {"weight_map": {"w": "../w.safetensors"}}).parent, d / "o"),
            "shard '../w.safetensors' of tensor 'w' is not a file in",
        ),
    ),
    (
        "base-index-not-json",
        lambda d: (
            apply_args(indexed_base(d, "{oops").parent, d / "o"),
            "model.safetensors.index.json is not a usable safetensors index",
        ),
    ),
    (
        "base-index-missing-shard",
        lambda d: (
            apply_args(indexed_base(d, {"weight_map": {"w": "s1.safetensors"}}).parent, d / "o"),
            "s1.safetensors, a weights file of the base model, is missing",
        ),
    ),
    (
        "base-without-weights",
        lambda d: (
            ["apply", empty_folder(d / "b"), forge_delta(d / DELTA_FILENAME, {}), d / "o"],
            "holds neither model.safetensors nor model.safetensors.index.json",
        ),
    ),
    # 4. forged deltas (checksum recomputed)
    (
        "delta-index-out-of-range",
        lambda d: (
            apply_args(d, d / "o", {"w.indices": torch.tensor([1, 16], dtype=torch.int32)}),
            "tensor 'w.indices' holds index 16; the tensor has 16 entries",
        ),
    ),
    (
        "delta-negative-index",
        lambda d: (
            apply_args(d, d / "o", {"w.indices": torch.tensor([-1, 5], dtype=torch.int32)}),
            "tensor 'w.indices' holds a negative or repeated index",
        ),
    ),
    (
        "delta-repeated-index",
        lambda d: (
            apply_args(d, d / "o", {"w.indices": torch.tensor([5, 5], dtype=torch.int32)}),
            "tensor 'w.indices' holds a negative or repeated index",
        ),
    ),
    (
        "delta-length-mismatch",
        lambda d: (
            apply_args(d, d / "o", {"w.values": torch.tensor([1.0, 2.0, 3.0])}),
            "tensor 'w.values' has 3 entries for 2 indices",
        ),
    ),
    (
        "delta-whole-tensor-wrong-size",
        lambda d: (
            apply_args(d, d / "o", {"b.values": torch.zeros(5)}),
            "tensor 'b.values' has 5 entries; the tensor has 4",
        ),
    ),
    (
        "delta-float64-values",
        lambda d: (
            apply_args(d, d / "o", {"w.values": torch.tensor([1.0, 2.0], dtype=torch.float64)}),
            "tensor 'w.values' has dtype torch.float64; the model trained it in float32",
        ),
    ),
    (
        "delta-unknown-tensor",
        lambda d: (
            apply_args(d, d / "o", {"lm_head.values": torch.zeros(2)}),
            "tensor 'lm_head.values' names no tensor of the base model",
        ),
    ),
    (
        "delta-unknown-suffix",
        lambda d: (
            apply_args(d, d / "o", {"w.weight": torch.zeros(2)}),
            "tensor 'w.weight' is neither '<key>.values' nor '<key>.indices'",
        ),
    ),
    (
        "delta-without-base-sha256",
        lambda d: (
            apply_args(d, d / "o", meta={"dtypes": DELTA_METADATA["dtypes"]}),
            "metadata field 'base_sha256' is missing",
        ),
    ),
    (
        "delta-without-dtypes",
        lambda d: (
            apply_args(d, d / "o", meta={"base_sha256": DELTA_METADATA["base_sha256"]}),
            "metadata field 'dtypes' is missing",
        ),
    ),
    (
        "delta-bad-dtype-name",
        lambda d: (
            apply_args(d, d / "o", meta=DELTA_METADATA | {"dtypes": {"w": "os", "b": "float32"}}),
            "metadata field 'dtypes' is not a map of tensor names to torch dtypes",
        ),
    ),
    (
        "delta-float-indices",
        lambda d: (
            apply_args(d, d / "o", {"w.indices": torch.tensor([1.0, 5.0])}),
            "tensor 'w.indices' must be 1-D int32/int64, not 1-D torch.float32",
        ),
    ),
    (
        "delta-nan-values",
        lambda d: (
            apply_args(d, d / "o", {"w.values": torch.tensor([float("nan"), 1.0])}),
            "tensor 'w.values' holds NaN or infinite values",
        ),
    ),
    (
        "delta-indices-without-values",
        lambda d: (
            apply_args(d, d / "o", {"w.values": None}),
            "tensor 'w.indices' has no 'w.values'",
        ),
    ),
    # 5. mask metadata is checked once, at load, naming the file and the field
    *(
        (
            f"mask-metadata-{name}",
            lambda d, name=name, value=value, what=what: (
                ["inspect", masked(d / "m.safetensors", **{name: value}), "--card"],
                f"m.safetensors: metadata field {what!r} is unusable",
            ),
        )
        for name, value, what in [
            ("num_examples", "16", "num_examples"),
            ("tie_breaks", [{}], "tie_breaks.0.score"),
            ("include", "q_proj", "include"),
            ("include", ["q_proj", "("], "include"),
            ("exclude", [3], "exclude.0"),
            ("strategy", "fisher\n```\n# injected", "strategy"),
            ("fisher_seconds", float("nan"), "fisher_seconds"),
            ("keep_ratio", 2, "keep_ratio"),
            ("seed", "7", "seed"),
        ]
    ),
    # 6. a heatmap needs tensors
    (
        "png-of-a-mask-without-tensors",
        lambda d: (
            ["inspect", masked_empty(d / "e.safetensors"), "--png", d / "e.png"],
            "e.safetensors holds no tensors: there is no heatmap to draw",
        ),
    ),
    (
        "png-under-a-file",
        lambda d: (
            [
                "inspect",
                saved_mask(d / "a.safetensors", seed=0),
                "--png",
                d / "a.safetensors" / "x.png",
            ],
            "--png",
        ),
    ),
    # 7. Hub references with `..`
    ("hub-revision-dotdot", lambda d: (["inspect", "hf://org/name@../main"], "contains '..'")),
    ("hub-path-dotdot", lambda d: (["inspect", "hf://org/name/../x"], "contains '..'")),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every folder, file (SHA-256) and link (its target) under root."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_one_error_line(output: str, message: str) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert message in lines[0], output


@pytest.mark.parametrize("make", [make for _, make in CASES], ids=[name for name, _ in CASES])
def test_hostile_input_is_one_error_line_and_changes_nothing(make, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # outside what is watched
    case = tmp_path / "case"
    case.mkdir()
    args, message = make(case)
    before = snapshot(case)
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, message)
    assert snapshot(case) == before


def test_the_base_is_refused_by_every_spelling_before_anything_is_read(tmp_path):
    """The issue's reproduction: a folder holding only model.safetensors as BASE and OUT_DIR."""
    base = base_folder(tmp_path / "w")
    (base / "config.json").unlink()
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    delta = forge_delta(tmp_path / DELTA_FILENAME, {})
    for out in (base, tmp_path / "w" / ".." / "w", Path(os.path.relpath(base))):
        result = invoke("apply", base, delta, out)
        assert result.exit_code == 1 and OWN in result.output, result.output
    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in base.iterdir()) == ["model.safetensors"]


def test_a_refusing_hub_endpoint_is_one_error_line(tmp_path):
    """The issue's command, in a fresh process: network allowed, the endpoint refuses."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "axolotl_fish", "inspect", "hf://a/b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1, run.stderr
    assert "No FISH mask at hf://a/b" in errors[0]
    assert "The Hub endpoint http://127.0.0.1:9 could not be read" in errors[0]


CONFIG_CASES = [
    ({"seed": 2**64}, "less than or equal to 4294967295"),  # failed after the Fisher pass
    ({"seed": -1}, "greater than or equal to 0"),
    ({"mask_path": ""}, "is empty"),  # meant the current folder
    ({"mask_path": "   "}, "is empty"),
    ({"mask_path": "hf://org/name@../main"}, "the revision '..' contains '..'"),
    ({"mask_path": "hf://org/name/a/../../b"}, "the path 'a/../../b' contains '..'"),
    ({"mask_path": "hf://buckets/org/b"}, "not a bucket"),
    ({"mask_path": "hf://just-a-name"}, "Invalid HF URI"),
]


@pytest.mark.parametrize(("setting", "message"), CONFIG_CASES, ids=lambda v: str(v)[:40])
def test_config_values_that_would_fail_later_fail_at_validation(
    make_cfg,  # noqa: F811 (the fixture imported above)
    setting,
    message,
):
    """Through Axolotl's own validation, naming the key."""
    with pytest.raises(ValueError) as err:
        validated(make_cfg(fish_mask={"keep_ratio": 0.5, **setting}))
    assert f"fish_mask.{next(iter(setting))}\n" in str(err.value)
    assert message in str(err.value)


# What must work.


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_apply_reads_the_weights_the_index_names_beside_consolidated(tmp_path, layout):
    """A Mistral-style folder: consolidated.safetensors (other names) beside the HF weights."""
    if layout == "single":
        base = base_folder(tmp_path / "base")
    else:
        shards = {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        base = base_folder(tmp_path / "base", {"metadata": {}, "weight_map": shards})
        for key, shard in shards.items():
            save_file({key: BASE_WEIGHTS[key]}, base / shard)
    save_file({"layers.0.attention.wq.weight": torch.ones(2)}, base / "consolidated.safetensors")
    out = tmp_path / "empty"
    out.mkdir()  # an empty OUT_DIR is fine
    result = invoke("apply", base, forge_delta(tmp_path / DELTA_FILENAME, {}), out)
    assert result.exit_code == 0, result.output
    rebuilt = load_file(out / "model.safetensors")
    expected = BASE_WEIGHTS["w"].clone().view(-1)
    expected[[1, 5]] = torch.tensor([-1.0, -5.0])
    assert torch.equal(rebuilt["w"].view(-1), expected) and torch.equal(
        rebuilt["b"], torch.zeros(4)
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".empty.*"))  # the staging folder is gone


@pytest.mark.parametrize("tensors", ["none", "zero-element"])
def test_inspect_and_diff_read_masks_without_entries(tmp_path, tensors):
    masks = {} if tensors == "none" else {Q.format(0, "A"): torch.zeros(0, 4, dtype=torch.bool)}
    path = FishMask(masks, {"strategy": "fisher"}).save(tmp_path / "m.safetensors")
    inspected = invoke("inspect", path, "--tensors", "--card")
    assert inspected.exit_code == 0, inspected.output
    assert "k = 0 of 0 (n/a)" in inspected.output
    diffed = invoke("diff", path, path)
    assert diffed.exit_code == 0, diffed.output
    assert "selected in A      0 (n/a)" in diffed.output


def test_png_into_a_missing_folder_is_created(tmp_path):
    path = saved_mask(tmp_path / "a.safetensors", seed=0)
    png = tmp_path / "new" / "deeper" / "a.png"
    result = invoke("inspect", path, "--png", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


# Where a mask's metadata reaches.


def test_the_plugin_refuses_bad_metadata_naming_the_key_and_the_file(tmp_path):
    from axolotl_fish.config import FishMaskConfig

    path = masked(tmp_path / "shared.safetensors", num_examples="16")
    config = FishMaskConfig(keep_ratio=0.5, mask_path=str(path))
    with pytest.raises(ValueError, match=r"fish_mask\.mask_path: .*shared\.safetensors: metadata "):
        _load_mask(config.mask_path, config)


def test_a_recorded_pattern_that_matches_nothing_blames_the_mask_file():
    model = tiny_lora_model("llama")
    mask = FishMask({}, {"include": ["no_such_module"]})
    with pytest.raises(ValueError) as err:
        check_mask_fits(mask, model, "shared.safetensors")
    message = str(err.value)
    assert message.startswith("shared.safetensors: the mask's recorded include pattern(s)")
    assert "fish_mask.include" not in message


def test_metadata_in_the_model_card_is_escaped():
    """Table cells and code spans hold exactly the recorded text, however it is spelled."""
    strategy = "my|`scorer` *bold* <b>x</b>"
    masks = {f"layers.0.{name}.lora_A.weight": torch.ones(2, dtype=torch.bool) for name in "pq"}
    meta = {"strategy": strategy, "include": ["a|b", "`c`"], "dense_outside": 4, "seed": 1}
    mask = FishMask(masks, meta)
    tokens = MarkdownIt("commonmark").enable("table").parse(card_section(mask, "o`ut|x"))
    inline = [child for token in tokens for child in token.children or ()]
    codes = [child.content for child in inline if child.type == "code_inline"]
    assert codes.count(strategy) == 3  # the table row, the Fisher samples row, the prose
    assert json.dumps(["a|b", "`c`"]) in codes
    assert "o`ut|x" in codes and "axolotl fish-mask inspect o`ut|x" in codes
    assert not any(child.type == "html_inline" for child in inline)
    # Nothing split a row or added one: 6 facts of 2 cells, modules p and q and matrix lora_A
    # of 4 cells each, plus a header row per table.
    assert sum(t.type == "tr_open" for t in tokens) == (1 + 6) + (1 + 2) + (1 + 1)
    assert sum(t.type == "td_open" for t in tokens) == 6 * 2 + 3 * 4
    assert [t.info for t in tokens if t.type == "fence"] == ["yaml", "yaml"]
