"""Masks read from the Hugging Face Hub (`hf://...`), resolved offline from a Hub cache folder by
huggingface_hub's own `hf_hub_download`, with the same loading checks as local files."""

from __future__ import annotations

import pickle

import pytest
import torch
from hub_cache import COMMIT, cache_file
from huggingface_hub import constants
from test_cli import invoke

from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.masks.source import load_mask

REPO = "fish-org/smollm2-sentiment-fish"


def sample_mask(seed: int) -> FishMask:
    generator = torch.Generator().manual_seed(seed)
    masks = {
        f"layers.{i}.q_proj.lora_A.weight": torch.rand(3, 4, generator=generator) < 0.5
        for i in (0, 1)
    }
    return FishMask(masks, {"strategy": "fisher", "seed": seed})


def mask_bytes(tmp_path, seed: int) -> bytes:
    return sample_mask(seed).save(tmp_path / f"mask-{seed}.safetensors").read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache in tmp_path/hub: nothing can come from the network."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def same(a: FishMask, b: FishMask) -> bool:
    return a.masks.keys() == b.masks.keys() and all(
        torch.equal(a.masks[k], b.masks[k]) for k in a.masks
    )


@pytest.mark.parametrize(
    ("reference", "path_in_repo", "revision"),
    [
        (f"hf://{REPO}", MASK_FILENAME, "main"),
        (f"hf://{REPO}@v1/run-3", f"run-3/{MASK_FILENAME}", "v1"),
        (f"hf://{REPO}/masks/sst2.safetensors", "masks/sst2.safetensors", "main"),
        (f"hf://{REPO}@{COMMIT}", MASK_FILENAME, "main"),
        (f"hf://datasets/{REPO}/fish.safetensors", "fish.safetensors", "main"),
    ],
)
def test_hub_reference_resolves_from_the_cache(
    hub_cache, tmp_path, reference, path_in_repo, revision
):
    repo_type = "dataset" if "datasets/" in reference else "model"
    cache_file(hub_cache, REPO, path_in_repo, mask_bytes(tmp_path, 1), revision, repo_type)
    cache_file(
        hub_cache, REPO, "decoy/" + MASK_FILENAME, mask_bytes(tmp_path, 2), revision, repo_type
    )
    assert same(load_mask(reference), sample_mask(1))


def test_a_reference_missing_from_the_offline_cache_names_it(hub_cache, tmp_path):
    cache_file(hub_cache, REPO, MASK_FILENAME, mask_bytes(tmp_path, 1))
    with pytest.raises(FileNotFoundError) as err:
        load_mask(f"hf://{REPO}@v2")
    message = str(err.value)
    assert f"No FISH mask at hf://{REPO}@v2" in message and "revision 'v2'" in message
    assert f"HF_HUB_OFFLINE is set, so only the local Hub cache ({hub_cache})" in message


def test_a_hub_file_gets_the_same_checks_as_a_local_one(hub_cache, tmp_path):
    """A pickle in the repository is refused, never unpickled; float weights are not a mask."""
    cache_file(hub_cache, REPO, MASK_FILENAME, pickle.dumps({"a": torch.ones(2)}))
    with pytest.raises(ValueError, match=f"hf://{REPO}: .* is not a readable safetensors mask"):
        load_mask(f"hf://{REPO}")
    floats = tmp_path / "floats.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, floats)
    cache_file(hub_cache, REPO, "weights.safetensors", floats.read_bytes())
    with pytest.raises(ValueError, match="tensor 'w' has dtype torch.float32, expected bool"):
        load_mask(f"hf://{REPO}/weights.safetensors")


@pytest.mark.parametrize(
    ("reference", "message"),
    [("hf://just-a-name", "Invalid HF URI"), ("hf://buckets/org/b", "not a bucket")],
)
def test_malformed_references_are_errors(hub_cache, reference, message):
    with pytest.raises(ValueError, match=message):
        load_mask(reference)


def test_a_local_path_is_never_a_hub_reference(tmp_path, hub_cache):
    """`org/name` that is not a local file stays a missing local file, never a download."""
    with pytest.raises(FileNotFoundError, match="No FISH mask file at fish-org/name"):
        load_mask("fish-org/name")


def test_inspect_and_diff_read_hub_references(hub_cache, tmp_path):
    cache_file(hub_cache, REPO, MASK_FILENAME, mask_bytes(tmp_path, 1))
    cache_file(hub_cache, REPO, "b/" + MASK_FILENAME, mask_bytes(tmp_path, 2))
    result = invoke("inspect", f"hf://{REPO}")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"hf://{REPO}\nk = {sample_mask(1).k} of 24 entries")
    result = invoke("diff", f"hf://{REPO}", f"hf://{REPO}/b")
    assert result.exit_code == 0, result.output
    assert f"A: hf://{REPO}\nB: hf://{REPO}/b" in result.output
    result = invoke("inspect", f"hf://{REPO}@nope")
    assert result.exit_code == 1 and f"Error: No FISH mask at hf://{REPO}@nope" in result.output
