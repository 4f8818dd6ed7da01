"""The snippet-source task builder, on a small fake vaderSentiment sdist (no download)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from axolotl_fish.demo import assets as offline_assets


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ground_truth(texts: list[str], bom: bool = False) -> bytes:
    lines = [f"{i}\t{0.5 * (i % 3 - 1):.2f}\t{text}" for i, text in enumerate(texts)]
    return ("\ufeff" if bom else "").encode() + "\r\n".join(lines).encode() + b"\r\n"


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    sources = {
        label: [f"{label} snippet {i}" for i in range(8)] for label in offline_assets.SOURCE_FILES
    }
    sources["tweet"][0] = "shared text"  # also the first product snippet: kept as tweet only
    sources["product"][0] = "shared text"
    sources["news"].append("news snippet 1")  # a repeat within one source
    inner = tar_bytes(
        {
            f"hutto_ICWSM_2014/{name}": ground_truth(sources[label], bom=label == "product")
            for label, name in offline_assets.SOURCE_FILES.items()
        }
    )
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(tar_bytes({f"vaderSentiment-3.3.2/{offline_assets.VADER_RATINGS}": inner}))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_source_task_is_balanced_disjoint_and_deterministic(
    sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offline_assets, "SOURCE_TEST_PER_LABEL", 2)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert offline_assets.build_source_dataset(first, sdist) == (4 * 5, 4 * 2)
    offline_assets.build_source_dataset(second, sdist)
    for name in ("train.jsonl", "test.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()

    train, test = read(first / "train.jsonl"), read(first / "test.jsonl")
    labels = sorted(offline_assets.SOURCE_FILES)
    for rows, per_label in ((train, 5), (test, 2)):
        assert sorted(r["output"] for r in rows) == sorted(labels * per_label)
        assert {r["instruction"] for r in rows} == {offline_assets.SOURCE_INSTRUCTION}
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    everything = train + test
    # 7 distinct product texts remain after the shared one went to "tweet": 7 per label kept.
    assert [r["output"] for r in everything if r["input"] == "shared text"] in ([], ["tweet"])
    assert all(not r["input"].startswith("\ufeff") and "\r" not in r["input"] for r in everything)
    inputs = [r["input"] for r in everything]
    assert len(inputs) == len(set(inputs))


def test_a_text_in_two_sources_stays_with_the_first(sdist: Path) -> None:
    files = offline_assets.read_snippets(sdist, list(offline_assets.SOURCE_FILES.values()))
    groups = offline_assets.source_groups(files)
    assert "shared text" in groups["tweet"]
    assert "shared text" not in groups["product"]
    assert len(groups["product"]) == 7 and len(groups["news"]) == 8
    assert groups["product"][0] == "product snippet 1"  # BOM and CRLF gone
