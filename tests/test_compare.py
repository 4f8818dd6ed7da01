"""`axolotl fish-mask compare` without training: the arms it derives, the split's content check,
the output folder rule and the verdict on fixed per-row results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from axolotl_fish.cli import fish_mask
from axolotl_fish.compare import report
from axolotl_fish.compare.arms import derive_arms
from axolotl_fish.compare.data import split

ARMS = ["dense LoRA r8", "fisher LoRA r16->r8", "random LoRA r16->r8"]


def rows(n: int, tag: str = "") -> list[dict[str, str]]:
    return [
        {"instruction": "Classify.", "input": f"{tag}review {i}", "output": "yes"} for i in range(n)
    ]


def project(tmp_path: Path, train: list[dict], test: list[dict], **config: object) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    body = {
        "base_model": "unused-in-a-dry-run",
        "datasets": [{"path": "train.jsonl", "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "max_steps": 5,
        "learning_rate": 1e-3,
        **config,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(body))
    return tmp_path / "config.yaml"


def invoke(tmp_path: Path, *args: str) -> Result:
    """The compare command run from `tmp_path` (relative dataset paths are read from there)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        return CliRunner().invoke(fish_mask, ["compare", *args])


def test_arms_have_equal_budgets_and_keep_the_users_settings() -> None:
    config = {
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "fish_mask": {
            "keep_ratio": 0.5,
            "num_samples": 32,
            "mask_path": "old.safetensors",
            "seed": 3,
        },
    }
    dense, fisher, random, yours = derive_arms(config, Path("c.yaml"))
    assert dense.overrides == {"lora_r": 8, "lora_alpha": 16}
    assert dense.fish_mask == {"keep_ratio": 1.0, "strategy": "random"}
    for arm, strategy in ((fisher, "fisher"), (random, "random")):
        assert arm.overrides == {"lora_r": 16, "lora_alpha": 32}
        # match_rank 8 on a rank-16 adapter: exactly dense rank 8's entries; no fixed mask file.
        assert arm.fish_mask == {"num_samples": 32, "match_rank": 8, "strategy": strategy}
    assert (yours.equal, yours.fish_mask["keep_ratio"]) == (False, 0.5)
    assert yours.config({"lora_r": 8}, seed=1)["fish_mask"]["seed"] == 1
    size = {"adapter": "bottleneck", "bottleneck": {"size": 16, "placement": "houlsby"}}
    wide = derive_arms(size, Path("c.yaml"))[1]
    assert wide.overrides == {"bottleneck": {"size": 32, "placement": "houlsby"}}
    assert wide.fish_mask["match_rank"] == 16
    with pytest.raises(ValueError, match="c.yaml: adapter is None"):
        derive_arms({}, Path("c.yaml"))


def test_split_is_disjoint_by_content_and_duplicates_stay_together() -> None:
    train = rows(20) + rows(5)  # rows 0-4 twice
    splits = split(train, rows(3, "new "), val_size=6)
    val = {json.dumps(r, sort_keys=True) for r in splits.val}
    assert len(val) == 6 and not any(json.dumps(r, sort_keys=True) in val for r in splits.train)
    assert len(splits.train) + sum(train.count(r) for r in splits.val) == len(train)


DRY_RUN = ("--test", "test.jsonl", "--out", "cmp", "--dry-run", "--val-size", "5")


def test_overlapping_test_file_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    config = project(tmp_path, rows(30), rows(4, "new ") + rows(30)[10:12])
    result = invoke(tmp_path, str(config), *DRY_RUN)
    assert result.exit_code == 1
    assert "2 of 6 rows of test.jsonl also occur in" in result.output
    assert not (tmp_path / "cmp").exists()


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path: Path) -> None:
    config = project(tmp_path, rows(30), rows(4, "new "))
    result = invoke(tmp_path, str(config), *DRY_RUN)
    assert result.exit_code == 0, result.output
    assert "25 train, 5 validation" in result.output
    assert "grid fisher LoRA r16->r8 lr 0.003 seed 0" in result.output  # ladder: 3e-4, 1e-3, 3e-3
    assert "trainings left: 15" in result.output  # 3 arms x 3 LRs + 3 arms x seeds 1, 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.yaml",
        "test.jsonl",
        "train.jsonl",
    ]


def test_out_folder_of_other_files_is_refused(tmp_path: Path) -> None:
    config = project(tmp_path, rows(30), rows(4, "new "))
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    result = invoke(tmp_path, str(config), "--test", "test.jsonl", "--out", "cmp", "--dry-run")
    assert result.exit_code == 1 and "is not a comparison's folder" in result.output


def recorded(correct: dict[str, list[np.ndarray]]) -> list[dict]:
    """Test rows as the results file holds them, from per-seed 0/1 arrays per arm."""
    return [
        {
            "kind": "test",
            "arm": arm,
            "seed": seed,
            "lr": 1e-3,
            "k": 100,
            "test_correct": "".join("1" if v else "0" for v in values),
            "test_nll_rows": list(1.0 - 0.5 * values),
        }
        for arm, seeds in correct.items()
        for seed, values in enumerate(seeds)
    ]


def test_verdict_claims_only_what_both_intervals_allow() -> None:
    rng = np.random.default_rng(0)
    base = [(rng.random(400) < 0.7).astype(float) for _ in range(3)]
    better = [b.copy() for b in base]
    for b in better:
        b[:80] = 1.0  # fisher also gets the first 80 rows right at every seed
    noisy = [(rng.random(400) < 0.7).astype(float) for _ in range(3)]
    line = report.verdict(
        report.test_rows(recorded({ARMS[0]: base, ARMS[1]: better, ARMS[2]: noisy})), ARMS, 3
    )
    assert line.startswith("Verdict (test accuracy): ")
    assert "fisher LoRA r16->r8 beats dense LoRA r8" in line
    # Fisher vs an unrelated random arm of the same accuracy: the intervals span 0.
    same = recorded({ARMS[0]: base, ARMS[1]: noisy, ARMS[2]: base})
    line = report.verdict(report.test_rows(same), ARMS, 3)
    assert "fisher LoRA r16->r8 vs dense LoRA r8: no difference shown" in line
    # One seed of three planned: nothing is claimed, however large the gap.
    first = recorded({ARMS[0]: base[:1], ARMS[1]: better[:1], ARMS[2]: noisy[:1]})
    assert "no claim yet (1 of 3 seeds)" in report.verdict(report.test_rows(first), ARMS, 3)
    # Open-ended answers (no correctness recorded): the verdict is on the answer loss.
    loss_only = [
        {k: v for k, v in r.items() if k != "test_correct"}
        for r in recorded({ARMS[0]: base, ARMS[1]: better, ARMS[2]: base})
    ]
    line = report.verdict(report.test_rows(loss_only), ARMS, 3)
    assert line.startswith("Verdict (test answer loss): ")
    assert "fisher LoRA r16->r8 beats dense LoRA r8" in line
    assert "fisher LoRA r16->r8 beats random LoRA r16->r8" in line


def test_benchmark_keys_your_data_by_content_and_keeps_out_of_docs(tmp_path: Path) -> None:
    from benchmark_modules import benchmarks_importable

    with benchmarks_importable():
        import quality
    named_like_a_task = tmp_path / "sentiment.jsonl"
    named_like_a_task.write_text(json.dumps(rows(1)[0]) + "\n")
    args = quality.parse_args(["--data", str(named_like_a_task)])
    assert args.task_names[0].startswith("data-") and args.task_names[0] != "sentiment"
    assert "docs" not in args.results.parts and "docs" not in args.out.parts
    named_like_a_task.write_text(json.dumps(rows(2)[1]) + "\n")  # other content, other task
    assert quality.parse_args(["--data", str(named_like_a_task)]).task_names != args.task_names
    assert quality.parse_args([]).results == Path("docs/quality_protocol.jsonl")


def test_scores_match_a_plain_forward(tiny_llama_dir: Path) -> None:
    """Answer loss and the cached closed-set log-probabilities equal one unpadded forward per
    row (rows of different lengths, so padding and positions matter)."""
    import torch

    from axolotl_fish.compare.scoring import (
        IGNORE,
        Row,
        SplitScorer,
        answer_logprobs,
        answer_nll,
        closed_set,
        load_model,
    )

    model = load_model(tiny_llama_dir, None, "cpu")
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55], [1, 60]]
    answers = [[70, 71, 2], [80, 2]]
    rows = [
        Row(p + a, [IGNORE] * len(p) + a)
        for p, a in zip(prompts, [*answers, answers[0]], strict=True)
    ]
    assert closed_set(rows, 10) == [(70, 71, 2), (80, 2)]
    assert closed_set(rows, 1) is None

    def plain(ids: list[int], start: int) -> torch.Tensor:
        """Log-probabilities of ids[start:] given what precedes them."""
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return logits[start - 1 : -1].gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1)

    with torch.no_grad():
        nll = answer_nll(model, rows, pad=0, batch=3)
        for row, value in zip(rows, nll, strict=True):
            expected = -plain(row.input_ids, len(row.prompt)).mean()
            assert value.item() == pytest.approx(expected.item(), abs=1e-4)
        table = answer_logprobs(model, prompts, answers, pad=0)
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(answers):
                expected = plain(prompt + answer, len(prompt)).sum()
                assert table[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    # With a closed set the loss comes from the same pass as the accuracy: it must not change.
    scored = SplitScorer(rows, str(tiny_llama_dir), Path.cwd(), 10, False).score(None, "test")
    assert scored["test_nll_rows"] == pytest.approx(nll.tolist(), abs=1e-4)
    best = table.argmax(dim=1).tolist()
    assert scored["test_correct"] == "".join(
        "1" if b == g else "0" for b, g in zip(best, [0, 1, 0], strict=False)
    )


def test_report_writes_table_and_plot_into_the_folder_only(tmp_path: Path) -> None:
    seeds = [np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])]
    lines = report.write_report(
        recorded({arm: seeds for arm in ARMS}), ARMS, [0, 1], ["header"], tmp_path
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.md", "compare.png"]
    assert "| dense LoRA r8 | 100 | 0.001 | 50.0 | 25.0 | 37.5 | - |" in lines
    assert "no claim yet (2 of 3 seeds)" in lines[0]
    assert (tmp_path / "compare.md").read_text().count("| fisher LoRA r16->r8 |") == 2  # 2 metrics
