"""The core checks what every recipe returns: the count is the validation stream's n − 1 scored positions,
the NLL sum is finite and the hits are at most the count. A recipe that breaks this fails its unit with one
line and exit 1, and the run's files stay strictly valid JSON with the other units' results intact."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_case
from fixtures import synthetic_ids

from newllm_kit import cli
from newllm_kit.errors import RunFailed
from newllm_kit.experiment import check_outputs
from newllm_kit.plots import write_plots
from newllm_kit.plugins import Plugins, load_plugins
from newllm_kit.protocols import EvalOutputs
from newllm_kit.run import execute
from newllm_kit.strict_json import json_text

EXPERIMENT = """
[experiment]
name = "outputs"
samples = [12, 24]
seed = 7

[data]
source = "synthetic"
words_per_doc = 20
docs = 400
val = { start = 300, count = 12 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[runner]
name = "cpu"

[faulty]
fault = "FAULT"

[[models]]
label = "GOOD"
architecture = "cvfp"
recipe = "unigram"
layers = 1
context_dim = 8
embedding_dim = 8

[[models]]
label = "BAD"
architecture = "cvfp"
recipe = "faulty"
layers = 1
context_dim = 8
embedding_dim = 8
"""

PROBLEMS = {"nan": "nll_sum = nan, not a finite number",
            "half": "scored positions (1 … n−1, each exactly once)",
            "hits": "outside 0 … count"}


def strict(text: str) -> Any:
    """json.loads that refuses the NaN and Infinity literals Python's json accepts."""

    def refuse(literal: str) -> Any:
        raise ValueError(f"not JSON: {literal}")

    return json.loads(text, parse_constant=refuse)


def unigram_ppl(samples: int) -> float:
    """The `unigram` recipe's validation PPL written out: add-one byte counts of the first `samples` rows,
    scored on validation positions 1 … n−1 of rows 300-311."""
    counts = np.bincount(synthetic_ids(range(samples)), minlength=256) + 1.0
    targets = synthetic_ids(range(300, 312))[1:]
    return math.exp(-np.log(counts[targets] / counts.sum()).mean())


def faulty_plugins() -> Plugins:
    return load_plugins(extra=[("faulty_recipe", load_case("faulty_recipe"))])


def write_experiment(tmp_path: Path, fault: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.replace("FAULT", fault))
    return path


def main(argv: list[str], plugins: Plugins, monkeypatch: pytest.MonkeyPatch) -> int:
    """`newllm-kit ARGV` in this process with these plugins; its exit code."""
    monkeypatch.setattr(sys, "argv", ["newllm-kit", *argv])
    monkeypatch.setitem(cli._state, "plugins", plugins)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
        raise SystemExit(0)
    return int(stopped.value.code or 0)


def only_run_dir(out: Path) -> Path:
    [run_dir] = [p for p in (out / "outputs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


@pytest.mark.parametrize("fault", sorted(PROBLEMS))
def test_a_recipes_broken_outputs_fail_its_unit_in_one_line_and_keep_the_others(
        fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["run", str(write_experiment(tmp_path, fault)), "--out", str(out), "--progress", "none"],
                faulty_plugins(), monkeypatch)
    captured = capsys.readouterr()
    assert code == 1
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: BAD-12: recipe 'faulty' returned validation outputs ") and PROBLEMS[fault] in line
    assert "Traceback" not in captured.err and captured.out == ""
    run_dir = only_run_dir(out)
    records = [strict(row) for row in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["model"], r["samples"]) for r in records] == [("GOOD", 12), ("GOOD", 24)]
    assert [r["val_ppl"] for r in records] == pytest.approx([unigram_ppl(12), unigram_ppl(24)], rel=1e-12)
    meta = strict((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["failed_unit"] == "BAD-12" and "recipe 'faulty'" in meta["error"]
    summary = strict((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary["results"]] == ["GOOD", "GOOD"]
    rows = [strict(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"unit": "BAD-12", "phase": "faulty", "attempt": 1, "iteration": 1, "loss": None, "rate": None} in rows
    assert len(write_plots(run_dir)) >= 2  # the finished units' pictures; the failed one stops nothing


def test_a_recipe_that_evaluates_nothing_runs_and_its_metrics_are_null(tmp_path: Path) -> None:
    result = execute(write_experiment(tmp_path, "skip"), [], tmp_path / "runs", False, "none", faulty_plugins())
    run_dir = Path(result["run_dir"])
    records = [strict(row) for row in (run_dir / "results.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["model"] == "BAD"]
    assert len(skipped) == 2 and all(r["val_ppl"] is None and r["val_acc"] is None for r in skipped)
    assert all(r["overflow"] is None for r in records if r["model"] == "BAD")
    summary = strict((run_dir / "summary.json").read_text())
    assert [fit["model"] for fit in summary["scaling"]["fits"]] == ["GOOD"]  # no fit through missing PPLs
    assert strict((run_dir / "meta.json").read_text())["status"] == "finished"
    names = {p.name for p in write_plots(run_dir)}
    assert {"unit-BAD-12.png", "scaling.png"} <= names


@pytest.mark.parametrize("source", ["results.jsonl", "results.csv"])
def test_scaling_reads_a_missing_ppl_as_no_point(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = Path(execute(write_experiment(tmp_path, "skip"), [], tmp_path / "runs", False, "none",
                           faulty_plugins())["run_dir"])
    code = main(["scaling", str(run_dir / source), "--json"], faulty_plugins(), monkeypatch)
    assert code == 0
    assert [fit["model"] for fit in strict(capsys.readouterr().out)["fits"]] == ["GOOD"]


def test_json_output_of_the_run_command_is_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(write_experiment(tmp_path, "skip")), "--out", str(tmp_path / "runs"), "--json"],
                faulty_plugins(), monkeypatch)
    assert code == 0
    document = strict(capsys.readouterr().out)
    assert [r["val_ppl"] for r in document["results"] if r["model"] == "BAD"] == [None, None]


@pytest.mark.parametrize(("outputs", "problem"), [
    (EvalOutputs(nll_sum=1.0, correct=0, count=10), "count = 10"),
    (EvalOutputs(nll_sum=math.inf, correct=0, count=11), "nll_sum = inf"),
    (EvalOutputs(nll_sum=1.0, correct=-1, count=11), "correct = -1"),
    (EvalOutputs(nll_sum=1.0, correct=0, count=0), "count = 0"),  # scored nothing, yet an NLL
    (EvalOutputs(nll_sum=1.0, correct=0, count=11.0), "count = 11.0"),  # type: ignore[arg-type]
])
def test_outputs_that_no_metric_could_trust_are_refused(outputs: EvalOutputs, problem: str) -> None:
    with pytest.raises(RunFailed, match=f"recipe 'r' returned validation outputs with {problem}"):
        check_outputs("r", outputs, 12)


def test_honest_and_empty_outputs_pass() -> None:
    check_outputs("r", EvalOutputs(nll_sum=5.0, correct=11, count=11), 12)
    check_outputs("r", EvalOutputs(), 12)


def test_json_text_writes_null_for_non_finite_numbers() -> None:
    value = {"ppl": math.inf, "nested": [math.nan, -math.inf, 1.5], "pair": (2, math.nan)}
    assert strict(json_text(value)) == {"nested": [None, None, 1.5], "pair": [2, None], "ppl": None}
