"""`axolotl fish-mask compute | inspect | diff` and `python -m axolotl_fish`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from axolotl_run import (
    OFFLINE_ENV,
    run_axolotl,
    run_axolotl_train,
    write_config,
)
from click.testing import CliRunner
from safetensors.torch import save_file

from axolotl_fish.cli import fish_mask
from axolotl_fish.masks.file import MASK_FILENAME, FishMask

EXAMPLES = Path(__file__).parent.parent / "example_configs"
Q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def saved_mask(path, seed: int, strategy: str = "fisher"):
    generator = torch.Generator().manual_seed(seed)
    masks = {
        Q.format(i, m): torch.rand(4, 4, generator=generator) < 0.5 for i in (0, 1) for m in "AB"
    }
    return FishMask(masks, {"strategy": strategy, "seed": seed}).save(path)


def invoke(*args: str):
    return CliRunner().invoke(fish_mask, [str(a) for a in args])


def test_inspect_prints_the_report_and_writes_a_heatmap(tmp_path):
    path = saved_mask(tmp_path / "a.safetensors", seed=0)
    mask = FishMask.load(path)
    result = invoke("inspect", path, "--png", tmp_path / "a.png", "--tensors")
    assert result.exit_code == 0, result.output
    assert f"k = {mask.k} of 64 entries selected" in result.output
    for heading in ("layer", "module type", "matrix", "tensor"):
        assert f"selected per {heading}:" in result.output
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_reads_a_folder_holding_a_mask(tmp_path):
    saved_mask(tmp_path / MASK_FILENAME, seed=0)
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 0 and "k = " in result.output


def test_diff_reports_the_overlap(tmp_path):
    a = FishMask.load(saved_mask(tmp_path / "a.safetensors", seed=0))
    b = FishMask.load(saved_mask(tmp_path / "b.safetensors", seed=1, strategy="random"))
    both = sum(int((a.masks[k] & b.masks[k]).sum()) for k in a.masks)
    result = invoke("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.output
    assert f"in both            {both} " in result.output
    assert f"Jaccard            {both / (a.k + b.k - both):.4f}" in result.output
    assert 'strategy: A "fisher", B "random"' in result.output


def broken_files(tmp_path):
    """(file, what the error must say) for files that are not usable masks."""
    corrupt = tmp_path / "corrupt.safetensors"
    saved_mask(corrupt, seed=0)
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    pickled = tmp_path / "mask.pt"
    torch.save({Q.format(0, "A"): torch.ones(4, 4, dtype=torch.bool)}, pickled)
    adapter = tmp_path / "adapter_model.safetensors"
    save_file({Q.format(0, "A"): torch.ones(4, 4)}, adapter)
    return [
        (tmp_path / "missing.safetensors", "No FISH mask file at"),
        (corrupt, "corrupt.safetensors is not a readable safetensors mask file"),
        (pickled, "mask.pt is not a readable safetensors mask file (masks are never read with "),
        (adapter, "has dtype torch.float32, expected bool"),
    ]


def test_unusable_files_are_clear_errors(tmp_path):
    good = saved_mask(tmp_path / "good.safetensors", seed=0)
    for path, message in broken_files(tmp_path):
        for args in (("inspect", path), ("diff", good, path), ("diff", path, good)):
            result = invoke(*args)
            assert result.exit_code == 1, (args, result.output)
            assert message in result.output and "Traceback" not in result.output, result.output


def test_diff_of_masks_for_other_adapters_names_the_tensor(tmp_path):
    a = saved_mask(tmp_path / "a.safetensors", seed=0)
    mask = FishMask.load(a)
    del mask.masks[Q.format(1, "B")]
    b = mask.save(tmp_path / "b.safetensors")
    result = invoke("diff", a, b)
    assert result.exit_code == 1
    assert "do not cover the same tensors" in result.output
    assert f"Tensor '{Q.format(1, 'B')}' is only in mask A" in result.output


def test_registered_as_axolotl_subcommand_and_as_module(tmp_path):
    a = saved_mask(tmp_path / "a.safetensors", seed=0)
    log = run_axolotl(["fish-mask", "inspect", str(a)], cwd=tmp_path, timeout=120).stdout
    assert "selected per module type:" in log
    module = subprocess.run(
        [sys.executable, "-m", "axolotl_fish", "diff", str(a), str(a)],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Jaccard            1.0000" in module.stdout


@pytest.mark.e2e
def test_compute_writes_the_mask_train_computes(tmp_path, tiny_llama_dir, alpaca_jsonl):
    """The smoke example on the tiny model: `compute` gives the mask `axolotl train` computes
    for the same config (training on a `compute`d file: test_e2e_axolotl's mask_path test)."""
    cfg = yaml.safe_load((EXAMPLES / "smollm2_smoke_fish.yaml").read_text())
    cfg |= {
        "base_model": str(tiny_llama_dir),
        "datasets": [{**cfg["datasets"][0], "path": str(alpaca_jsonl)}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
    }
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(cfg))
    computed = tmp_path / "computed.safetensors"
    log = run_axolotl(["fish-mask", "compute", str(config), "--output", str(computed)], tmp_path)
    assert f"mask written to {computed}" in log.stdout
    assert not (tmp_path / "out" / "checkpoint-2").exists()  # no training

    run_axolotl_train(config, cwd=tmp_path)
    mask, trained = FishMask.load(computed), FishMask.load(tmp_path / "out")
    assert mask.k == round(0.5 * mask.total) and mask.metadata["num_examples"] == 16
    assert mask.masks.keys() == trained.masks.keys()
    assert all(torch.equal(trained.masks[k], m) for k, m in mask.masks.items())


def test_compute_without_the_plugin_says_what_is_missing(tmp_path, tiny_llama_dir, alpaca_jsonl):
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, fish_mask={"keep_ratio": 0.5})
    with pytest.raises(AssertionError, match="exited with 1") as err:
        run_axolotl(["fish-mask", "compute", str(config)], cwd=tmp_path, timeout=180)
    assert "needs `plugins: [axolotl_fish.FishMaskPlugin]` and a `fish_mask:` block" in str(
        err.value
    )
    assert not (tmp_path / "out" / MASK_FILENAME).exists()
