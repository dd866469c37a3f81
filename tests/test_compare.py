"""`newllm-kit compare`: paired or Welch differences with intervals, verdicts, α differences, and
the same fingerprint refusal as `scaling`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from test_cli import cli

from newllm_kit.compare import compare
from newllm_kit.errors import UserError
from newllm_kit.stats import paired, welch

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


def test_shared_seeds_are_paired_and_the_gap_is_found(run: Path) -> None:
    document = compare([run], "val_ppl", "model", False)
    first = document["comparisons"][0]
    a = [PPL[("A", 100, s)] for s in (1, 2, 3)]
    b = [PPL[("B", 100, s)] for s in (1, 2, 3)]
    expected = paired(a, b)
    assert (first["context"], first["a"], first["b"], first["method"]) == ("100 docs", "A", "B", "paired")
    assert first["ci"] == pytest.approx([expected.low, expected.high])
    assert first["verdict"].startswith("A lower than B by 2.") and first["verdict"].endswith(": distinguishable")
    assert not welch(a, b).excludes_zero  # unpaired, the seed noise would hide the same gap


def test_different_seeds_fall_back_to_welch_and_say_within_noise(tmp_path: Path) -> None:
    records = [record("A", 100, s, PPL[("A", 100, s)]) for s in (1, 2, 3)]
    records += [record("B", 100, s + 10, PPL[("B", 100, s)]) for s in (1, 2, 3)]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", "model", False)["comparisons"]
    assert only["method"] == "welch" and only["verdict"].endswith(": within noise")


def test_one_seed_gives_no_interval_and_says_how_to_get_one(tmp_path: Path) -> None:
    records = [record("A", 100, 1, 300.0), record("B", 100, 1, 310.0)]
    (only,) = compare([write_run(tmp_path / "r", records)], "val_ppl", "model", False)["comparisons"]
    assert only["ci"] is None and "add experiment.seeds" in only["verdict"]


def test_alpha_difference_of_the_fits(run: Path) -> None:
    """Each side's α and standard error from scipy's least squares on ln PPL against ln tokens, then
    Welch's interval with Welch–Satterthwaite degrees of freedom, written out here."""
    (alpha,) = compare([run], "val_ppl", "model", False)["alpha"]
    fits = {m: stats.linregress(np.log([n * 50.0 for (k, n, _) in PPL if k == m]),
                                np.log([v for (k, _, _), v in PPL.items() if k == m])) for m in ("A", "B")}
    se2 = fits["A"].stderr ** 2 + fits["B"].stderr ** 2
    df = se2**2 / (fits["A"].stderr ** 4 / 4 + fits["B"].stderr ** 4 / 4)  # 6 points − 2 parameters a side
    half = stats.t.ppf(0.975, df) * np.sqrt(se2)
    expected = fits["A"].slope - fits["B"].slope
    assert alpha["a"] == "A" and alpha["b"] == "B" and alpha["n_a"] == alpha["n_b"] == 6
    assert (alpha["mean_a"], alpha["mean_b"]) == pytest.approx((fits["A"].slope, fits["B"].slope), rel=1e-9)
    assert alpha["difference"] == pytest.approx(expected, rel=1e-9)
    assert alpha["ci"] == pytest.approx([expected - half, expected + half], rel=1e-9)
    assert alpha["verdict"].startswith(f"α(A) − α(B) = {expected:+.4f} (95% CI {expected - half:+.4f} … ")


def test_variants_are_compared_within_each_model(tmp_path: Path) -> None:
    records = [record("A", 100, s, 300.0 + s + (5 if v == "hi" else 0), variant=v) for v in ("lo", "hi")
               for s in (1, 2, 3)]
    document = compare([write_run(tmp_path / "r", records)], "val_ppl", "variant", False)
    (only,) = document["comparisons"]
    assert (only["context"], only["a"], only["b"]) == ("A, 100 docs", "lo", "hi")
    assert only["difference"] == pytest.approx(-5.0) and only["verdict"].endswith("distinguishable")


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
    assert json.loads(result.stdout)["comparisons"][0]["method"] == "paired"
    text = cli("compare", str(run))
    assert "A lower than B" in text.stdout and "distinguishable" in text.stdout
