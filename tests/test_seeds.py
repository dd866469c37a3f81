"""Seeds: every unit once per seed, ids that name the seed only when there are several, per-seed
resume, and the end-of-run table of means with t-intervals."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as scipy_stats

from newllm_kit.config import load_config
from newllm_kit.errors import ConfigError
from newllm_kit.experiment import plan, record_key
from newllm_kit.flops import flops_text
from newllm_kit.plugins import load_plugins
from newllm_kit.registry import Registry
from newllm_kit.report import print_results
from newllm_kit.run import execute
from newllm_kit.stats import t_interval

# The smallest run that still trains both phases: one model, one size, a few hundred byte tokens.
MICRO = """
[experiment]
name = "micro"
samples = [12]
seed = 7

[data]
source = "synthetic"
words_per_doc = 12
docs = 80
val = { start = 60, count = 6 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[solver]
name = "cvfp"
min_iterations = 1
max_iterations = 2
batch_size = 512

[phase2]
epochs = 2
patience = 1
batch_size = 128
learning_rate = 0.01

[runner]
name = "cpu"

[[models]]
label = "A"
variant = "gradual-reduction"
layers = 1
context_dim = 8
embedding_dim = 8
"""


def write_micro(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(MICRO + extra)
    return path


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_plugins().registry


def test_several_seeds_name_the_seed_and_one_seed_keeps_the_old_ids(registry: Registry, tmp_path: Path) -> None:
    one = plan(load_config(write_micro(tmp_path), registry, ["experiment.samples=[12, 24]"]))
    assert [u.id for u in one] == ["A-12", "A-24"] and {u.seed for u in one} == {7}
    three = plan(load_config(write_micro(tmp_path), registry, ["experiment.seeds=[1, 2, 3]"]))
    assert [u.id for u in three] == ["A-12-s1", "A-12-s2", "A-12-s3"]
    assert "seeds" not in load_config(write_micro(tmp_path), registry).resolved()["experiment"]


@pytest.mark.parametrize(("seeds", "message"), [("[1, 1]", "seeds must be distinct"), ("[-1]", "between 0 and"),
                                                 ("[]", "at least 1 item")])
def test_bad_seed_lists_are_one_line_errors(registry: Registry, tmp_path: Path, seeds: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"micro\.toml: experiment\.seeds: .*{message}"):
        load_config(write_micro(tmp_path), registry, [f"experiment.seeds={seeds}"])


def test_records_written_before_seeds_existed_belong_to_the_single_seed() -> None:
    assert record_key({"model": "A", "samples": 12}, 7) == ("", "A", 12, 7)
    assert record_key({"model": "A", "samples": 12, "seed": 3, "variant": "v"}, 7) == ("v", "A", 12, 3)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("seeds")
    return execute(write_micro(tmp, ""), ["experiment.seeds=[1, 2]"], tmp / "runs", False, "none", load_plugins())


def test_each_seed_is_a_record_with_its_own_numbers(two_seeds: dict[str, Any]) -> None:
    records = two_seeds["results"]
    assert [(r["model"], r["samples"], r["seed"]) for r in records] == [("A", 12, 1), ("A", 12, 2)]
    assert records[0]["val_ppl"] != records[1]["val_ppl"]  # different initial weights
    assert records[0]["fingerprints"] == records[1]["fingerprints"]  # the same data
    run_dir = Path(two_seeds["run_dir"])
    rows = list(csv.DictReader(io.StringIO((run_dir / "results.csv").read_text())))
    assert [(row["model"], row["seed"]) for row in rows] == [("A", "1"), ("A", "2")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m["unit"] for m in metrics} == {"A-12-s1", "A-12-s2"}


def test_resuming_a_seeded_run_recomputes_nothing(two_seeds: dict[str, Any]) -> None:
    run_dir = Path(two_seeds["run_dir"])
    before = (run_dir / "metrics.jsonl").read_text()
    again = execute(run_dir, [], run_dir.parent.parent, True, "none", load_plugins())
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert [r["val_ppl"] for r in again["results"]] == [r["val_ppl"] for r in two_seeds["results"]]


def test_the_table_shows_mean_interval_and_n(two_seeds: dict[str, Any]) -> None:
    console = Console(width=100, record=True, color_system=None)
    print_results(console, {**two_seeds, "plots": "somewhere/plots"})
    text = console.export_text()
    interval = t_interval([r["val_ppl"] for r in two_seeds["results"]])
    assert interval.half_width is not None
    assert f"{interval.mean:.1f} ± {interval.half_width:.1f}" in text
    header = next(line for line in text.splitlines() if "Val PPL" in line)
    assert header.split()[:5] == ["Model", "Samples", "Tokens", "FLOPs", "n"] and "Val ER % ↑" in header
    row = next(line for line in text.splitlines() if line.startswith("A "))
    a12 = [r for r in two_seeds["results"] if (r["model"], r["samples"]) == ("A", 12)]
    flops = flops_text(sum(r["train_flops"] for r in a12) / len(a12))
    assert row.split()[:5] == ["A", "12", f"{a12[0]['train_tokens']:,}", flops, "2"]
    assert "over n seeds" in text and "plots: somewhere/plots" in text


def test_seeds_give_scaling_an_interval_from_two_sizes_and_one_seed_keeps_the_warning() -> None:
    from newllm_kit.scaling import Point, fit_all, report_to_json

    noise = {1: 1.00, 2: 1.03, 3: 0.98}
    points = [Point("A", t, 5000 * t**-0.3 * noise[s], None, "results.jsonl", s) for t in (1e4, 2e4) for s in noise]
    (fit,) = fit_all(points, []).fits
    # the pooled OLS of ln PPL on ln tokens over the 6 points, its t-interval from scipy's standard error
    reference = scipy_stats.linregress(np.log([p.tokens for p in points]), np.log([p.ppl for p in points]))
    half = scipy_stats.t.ppf(0.975, 4) * reference.stderr
    assert fit.alpha == pytest.approx(reference.slope, abs=1e-12) == pytest.approx(-0.3, abs=1e-12)
    assert fit.alpha_ci == pytest.approx((reference.slope - half, reference.slope + half), rel=1e-9)
    assert (fit.points, fit.sizes, fit.seeds) == (6, 2, 3)
    assert any("seed noise only" in w for w in fit.warnings)
    assert report_to_json(fit_all(points, []))["fits"][0]["seeds"] == 3
    single = fit_all([p for p in points if p.seed == 1], [])
    assert single.fits[0].alpha_ci is None and "2 points, R² = 1 by construction" in single.warnings[0]
