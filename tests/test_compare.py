"""`newllm-kit compare`: val_ppl on NLL, Welch across models and paired seeds within one model's
variants, zero spread as no interval, Holm's correction, α per seed beside the pooled fit, and the
same fingerprint refusal as `scaling`, and each side's training FLOPs. Per-document sums:
tests/test_document_compare.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy import stats
from test_cli import cli

from newllm_kit.compare import compare, render
from newllm_kit.errors import UserError
from newllm_kit.stats import holm, welch

PRINTS = {"corpus": "c1", "tokenizer": "t1", "split": "s1"}
# val PPL per (model, documents, seed): B is A plus a small seed-independent gap
PPL = {("A", 100, 1): 300.0, ("A", 100, 2): 320.0, ("A", 100, 3): 290.0,
       ("A", 200, 1): 250.0, ("A", 200, 2): 262.0, ("A", 200, 3): 243.0}
PPL |= {("B", n, s): v * 1.02 + s * 0.1 for (_, n, s), v in PPL.items()}


def record(model: str, samples: int, seed: int, ppl: float, **extra: Any) -> dict[str, Any]:
    return {"model": model, "samples": samples, "seed": seed, "train_tokens": samples * 50, "val_ppl": ppl,
            "val_acc": 0.1, "fingerprints": PRINTS, **extra}


def write_run(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", [record(m, n, s, v) for (m, n, s), v in PPL.items()])


def logs(model: str, samples: int) -> list[float]:
    return [float(np.log(PPL[(model, samples, s)])) for s in (1, 2, 3)]


def test_models_are_unpaired_and_compared_on_nll(run: Path) -> None:
    """Different architectures share no seed effect: Welch on NLL = ln PPL, whatever the seeds."""
    document = compare([run], "val_ppl", "model", False)
    first = document["comparisons"][0]
    ref = stats.ttest_ind(logs("A", 100), logs("B", 100), equal_var=False).confidence_interval(0.95)
    assert document["scale"] == "nll"
    assert (first["context"], first["a"], first["b"], first["method"]) == ("100 docs", "A", "B", "welch")
    assert first["mean_a"] == pytest.approx(np.mean(logs("A", 100)))
    assert first["ci"] == pytest.approx([ref.low, ref.high], rel=1e-7)
    assert first["verdict"].startswith("A lower PPL than B by 2.") and first["verdict"].endswith(": within noise")


def test_variants_of_one_model_keep_their_seed_pairing(tmp_path: Path) -> None:
    records = [record("A", 100, s, PPL[("A", 100, s)] * (1.02 if v == "hi" else 1.0) + s * 0.1 * (v == "hi"),
                      variant=v) for v in ("lo", "hi") for s in (1, 2, 3)]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", "variant", False)["comparisons"]
    lo = [np.log(r["val_ppl"]) for r in records if r["variant"] == "lo"]
    hi = [np.log(r["val_ppl"]) for r in records if r["variant"] == "hi"]
    ref = stats.ttest_rel(lo, hi).confidence_interval(0.95)
    assert (only["context"], only["a"], only["b"], only["method"]) == ("A, 100 docs", "lo", "hi", "paired")
    assert only["ci"] == pytest.approx([ref.low, ref.high], rel=1e-7)
    assert only["verdict"].startswith("lo lower PPL than hi by 2.") and only["verdict"].endswith("distinguishable")
    assert not welch(lo, hi).excludes_zero  # unpaired, the seed noise would hide the same gap


def test_different_seeds_fall_back_to_welch_and_say_within_noise(tmp_path: Path) -> None:
    records = [record("A", 100, s, PPL[("A", 100, s)]) for s in (1, 2, 3)]
    records += [record("B", 100, s + 10, PPL[("B", 100, s)]) for s in (1, 2, 3)]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", "model", False)["comparisons"]
    assert only["method"] == "welch" and only["verdict"].endswith(": within noise")


def test_one_seed_gives_no_interval_and_says_how_to_get_one(tmp_path: Path) -> None:
    records = [record("A", 100, 1, 300.0), record("B", 100, 1, 310.0)]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", "model", False)["comparisons"]
    assert only["ci"] is None and "add experiment.seeds" in only["verdict"]


@pytest.mark.parametrize("by", ["model", "variant"])
def test_zero_spread_is_never_a_zero_width_interval(tmp_path: Path, by: str) -> None:
    records = [record(m, 100, s, 300.0 if m == "A" else 310.0) for m in ("A", "B") for s in (1, 2, 3)]
    if by == "variant":
        records = [{**r, "model": "A", "variant": "lo" if r["model"] == "A" else "hi"} for r in records]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", by, False)["comparisons"]
    assert only["ci"] is None and only["method"] == "none"
    assert only["verdict"].endswith(": not enough variation to compare")


def test_alpha_per_seed_with_a_t_interval_and_the_pooled_fit_beside_it(run: Path) -> None:
    """One slope of ln PPL on ln tokens per seed (numpy's least squares), Welch over the seeds of two
    models (scipy); and the pooled fits' difference, from scipy's linregress, beside it."""
    (alpha,) = compare([run], "val_ppl", "model", False)["alpha"]
    slopes = {m: [np.polyfit(np.log([5000.0, 10000.0]), np.log([PPL[(m, 100, s)], PPL[(m, 200, s)]]), 1)[0]
                  for s in (1, 2, 3)] for m in ("A", "B")}
    ref = stats.ttest_ind(slopes["A"], slopes["B"], equal_var=False).confidence_interval(0.95)
    assert alpha["a"] == "A" and alpha["b"] == "B" and alpha["n_a"] == alpha["n_b"] == 3
    assert alpha["method"] == "welch"
    assert alpha["difference"] == pytest.approx(np.mean(slopes["A"]) - np.mean(slopes["B"]), rel=1e-9)
    assert alpha["ci"] == pytest.approx([ref.low, ref.high], rel=1e-7)
    fits = {m: stats.linregress(np.log([n * 50.0 for (k, n, _) in PPL if k == m]),
                                np.log([v for (k, _, _), v in PPL.items() if k == m])) for m in ("A", "B")}
    se2 = fits["A"].stderr ** 2 + fits["B"].stderr ** 2
    df = se2**2 / (fits["A"].stderr ** 4 / 4 + fits["B"].stderr ** 4 / 4)  # 6 points − 2 parameters a side
    half = stats.t.ppf(0.975, df) * np.sqrt(se2)
    pooled = fits["A"].slope - fits["B"].slope
    assert (alpha["pooled"]["alpha_a"], alpha["pooled"]["alpha_b"]) == pytest.approx(
        (fits["A"].slope, fits["B"].slope), rel=1e-9)
    assert alpha["pooled"]["ci"] == pytest.approx([pooled - half, pooled + half], rel=1e-9)
    assert "one slope per seed" in alpha["verdict"] and "pooled fit (all seeds' points in one fit)" in alpha["verdict"]


def test_variants_are_compared_within_each_model(tmp_path: Path) -> None:
    records = [record("A", 100, s, 300.0 + s + (5 if v == "hi" else 0), variant=v) for v in ("lo", "hi")
               for s in (1, 2, 3)]
    document = compare([write_run(tmp_path / "r", records)], "val_ppl", "variant", False)
    (only,) = document["comparisons"]
    assert (only["context"], only["a"], only["b"]) == ("A, 100 docs", "lo", "hi")
    expected = np.mean([np.log(301.0 + k) - np.log(306.0 + k) for k in range(3)])
    assert only["difference"] == pytest.approx(expected) and only["verdict"].endswith("distinguishable")


def test_several_pairs_get_holms_correction_said_in_the_output(tmp_path: Path) -> None:
    """Three models: three comparisons in one call; each verdict compares Holm's adjusted p-value."""
    records = [record(m, 100, s, base + s * 3.0 + (0.4 * s * s if m == "C" else 0.0))
               for m, base in (("A", 300.0), ("B", 306.0), ("C", 312.0)) for s in (1, 2, 3)]
    document = compare([write_run(tmp_path / "r", records)], "val_ppl", "model", False)
    p = [c["p"] for c in document["comparisons"]]
    assert document["holm"]["comparisons"] == 3
    assert [c["p_holm"] for c in document["comparisons"]] == pytest.approx(holm(p))
    for c in document["comparisons"]:
        lifted = c["ci"][0] > 0 or c["ci"][1] < 0
        if lifted and c["p_holm"] >= 0.05:
            assert c["verdict"].endswith("within noise after Holm's correction for 3 comparisons")


def test_shares_are_compared_in_points(run: Path) -> None:
    first = compare([run], "val_acc", "model", False)["comparisons"][0]
    assert "0.00 points" in first["verdict"]


def test_mixed_fingerprints_are_refused_unless_allowed(run: Path, tmp_path: Path) -> None:
    other = write_run(tmp_path / "other", [{**record("C", 100, 1, 280.0), "fingerprints": {**PRINTS, "split": "x"}}])
    with pytest.raises(UserError, match=r"different data fingerprints .* --allow-mixed"):
        compare([run, other], "val_ppl", "model", False)
    assert "combined anyway" in " ".join(compare([run, other], "val_ppl", "model", True)["warnings"])


@pytest.mark.parametrize(("metric", "by", "message"), [("val_pll", "model", "--metric val_pll: not in the results"),
                                                        ("val_ppl", "variant", "--by variant: these results have no"),
                                                        ("val_ppl", "seed", "--by: expected model or variant")])
def test_bad_options_are_one_line_errors(run: Path, metric: str, by: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        compare([run], metric, by, False)


@pytest.mark.slow
def test_cli_prints_one_json_document_and_a_csv_source_works(run: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "results.csv"
    csv_file.write_text("model,samples,seed,train_tokens,val_ppl\n" + "".join(
        f"{m},{n},{s},{n * 50},{v}\n" for (m, n, s), v in PPL.items()))
    result = cli("compare", str(csv_file), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["comparisons"][0]["method"] == "welch"
    text = cli("compare", str(run))
    assert "A lower PPL than B" in text.stdout and "within noise" in text.stdout


def test_each_side_says_its_mean_training_flops_and_an_older_run_none(tmp_path: Path) -> None:
    flops = {"A": 2e12, "B": 1e12}
    counted = write_run(tmp_path / "counted", [record(m, n, s, v, train_flops=flops[m] * (1 + s / 10))
                                                for (m, n, s), v in PPL.items()])
    document = compare([counted], "val_ppl", "model", False)
    first = document["comparisons"][0]
    assert (first["flops_a"], first["flops_b"]) == (pytest.approx(2.4e12), pytest.approx(1.2e12))
    console = Console(record=True, width=250, color_system=None)
    render(document, console)
    assert "2.40e12 / 1.20e12 (2×)" in console.export_text()
    old = compare([write_run(tmp_path / "old", [record(m, n, s, v) for (m, n, s), v in PPL.items()])],
                  "val_ppl", "model", False)
    assert (old["comparisons"][0]["flops_a"], old["comparisons"][0]["flops_b"]) == (None, None)
