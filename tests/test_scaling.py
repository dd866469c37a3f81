"""Scaling-law fits: the seed's numbers, statistical properties, bad input, JSON shape, plot."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from newllm_kit import scaling, scaling_plot
from newllm_kit.errors import DataError, UserError
from newllm_kit.scaling import Point

SEED = Path(__file__).parent / "data" / "seed_tables.csv"


def seed_report(predict: list[float] | None = None, form: str = "power") -> dict[str, dict]:
    points, _ = scaling.load_points([SEED])
    report = scaling.report_to_json(scaling.fit_all(points, predict or [], form))
    return {f["model"]: f for f in report["fits"]}


def synthetic(model: str, tokens: list[float], ppls: list[float], source: str = "mem") -> list[Point]:
    return [Point(model, t, p, None, source) for t, p in zip(tokens, ppls, strict=True)]


# -- the seed's tables -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "alpha", "a", "r2"),
    [
        ("2025-11-27-3L", -0.7143, 2_264_935, 0.9818),
        ("2025-11-27-6L", -0.7463, 3_022_654, 0.9908),
        ("v2-A", -0.2926, 19_519, 1.0),
        ("v2-B", -0.2887, 18_891, 1.0),
        ("v1-A", -0.2877, 14_623, 1.0),
        ("v1-B", -0.3846, 46_550, 1.0),
    ],
)
def test_seed_fits_match_the_recomputed_values(model: str, alpha: float, a: float, r2: float) -> None:
    fit = seed_report()[model]
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-4)
    assert fit["A"] == pytest.approx(a, rel=1e-3)
    assert fit["r2"] == pytest.approx(r2, abs=1e-4)


def test_seed_doubling_reduction_and_v2_predictions_correct_the_summary() -> None:
    fits = seed_report([5e5, 1e6, 5e6, 1e7])
    v2a = fits["v2-A"]
    assert round(100 * v2a["doubling_reduction"], 1) == 18.4  # the summary says 22 %
    assert round(100 * fits["2025-11-27-3L"]["doubling_reduction"], 1) == 39.1
    assert round(100 * fits["v1-B"]["doubling_reduction"], 1) == 23.4
    ppl = [p["ppl"] for p in v2a["predictions"]]
    assert ppl == pytest.approx([419.7, 342.7, 214.0, 174.7], rel=1e-3)  # the summary says 383 at 500k
    assert all(p["pi"] is None for p in v2a["predictions"])
    assert v2a["predictions"][0]["extrapolation"] == pytest.approx(5e5 / 183_620)


def test_seed_interval_exists_only_with_three_or_more_token_counts() -> None:
    """The 3L table's 4 sizes: scipy's slope ± t(2)·stderr, and the textbook prediction interval of
    ln PPL at 500k tokens, ±t(2)·s·√(1 + 1/n + (x − x̄)²/Sxx)."""
    from scipy import stats

    fits = seed_report([5e5])
    x, y = np.log([3495.0, 7466, 15832, 39814]), np.log([7152.0, 3360, 2439, 1171])
    line, t = stats.linregress(x, y), stats.t.ppf(0.975, 2)
    assert fits["2025-11-27-3L"]["alpha_ci"] == pytest.approx([line.slope - t * line.stderr,
                                                               line.slope + t * line.stderr], rel=1e-9)
    s = np.sqrt(np.sum((y - line.intercept - line.slope * x) ** 2) / 2)
    at = np.log(5e5)
    centre = line.intercept + line.slope * at
    half = t * s * np.sqrt(1 + 1 / 4 + (at - x.mean()) ** 2 / np.sum((x - x.mean()) ** 2))
    (prediction,) = fits["2025-11-27-3L"]["predictions"]
    assert prediction["ppl"] == pytest.approx(np.exp(centre), rel=1e-9)
    assert prediction["pi"] == pytest.approx([np.exp(centre - half), np.exp(centre + half)], rel=1e-9)
    assert fits["v2-A"]["alpha_ci"] is None


# -- statistical properties --------------------------------------------------------------------
exponents = st.lists(st.integers(0, 70), min_size=2, max_size=8, unique=True)


@settings(max_examples=60, deadline=None)
@given(exponents, st.floats(-2.0, -0.05), st.floats(1.0, 1e7))
def test_exact_power_law_is_recovered(steps: list[int], alpha: float, a: float) -> None:
    tokens = [10 ** (2 + k / 10) for k in steps]
    fit = scaling.fit_power("m", tokens, [a * t**alpha for t in tokens], [])
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.A == pytest.approx(a, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_permuting_rows_changes_nothing(rng: object) -> None:
    points, _ = scaling.load_points([SEED])
    shuffled = list(points)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    predict = [5e5, 1e7]
    assert (scaling.report_to_json(scaling.fit_all(shuffled, predict, "power"))
            == scaling.report_to_json(scaling.fit_all(points, predict, "power")))


def test_alpha_interval_has_nominal_coverage() -> None:
    rng = np.random.default_rng(20251128)
    tokens = [1e4, 3e4, 1e5, 3e5, 1e6]
    alpha, a, sigma, runs = -0.3, 2e4, 0.05, 400
    covered = 0
    for _ in range(runs):
        noise = rng.normal(0, sigma, len(tokens))
        ppls = [a * t**alpha * math.exp(e) for t, e in zip(tokens, noise, strict=True)]
        ci = scaling.fit_power("m", tokens, ppls, []).alpha_ci
        assert ci is not None
        covered += ci[0] <= alpha <= ci[1]
    assert 0.90 <= covered / runs <= 0.99


# -- warnings ------------------------------------------------------------------------------------
def test_two_points_warn_that_r2_is_trivial() -> None:
    report = scaling.fit_all(synthetic("x", [1e3, 2e3], [100.0, 80.0]), [], "power")
    assert report.fits[0].r2 == 1.0 and report.fits[0].alpha_ci is None
    assert ("model x: 2 points, R² = 1 by construction; no interval can be estimated (a third training size "
            "gives one)") in report.warnings


@pytest.mark.parametrize(("reduction", "text"), [(0.184, "18.4% lower PPL"), (-0.191, "19.1% higher PPL"),
                                                  (0.0, "0.0% lower PPL")])
def test_doubling_is_said_without_a_double_negative(reduction: float, text: str) -> None:
    assert scaling.doubling_text(reduction) == text


def test_far_predictions_warn_about_extrapolation() -> None:
    report = scaling.fit_all(synthetic("x", [1e3, 2e3, 4e3], [100.0, 80.0, 65.0]), [3e4, 5e4], "power")
    assert len([w for w in report.warnings if "extrapolation" in w]) == 1
    assert "50,000 tokens" in next(w for w in report.warnings if "extrapolation" in w)


# -- offset form ---------------------------------------------------------------------------------
def test_offset_form_recovers_exact_parameters() -> None:
    e, a, alpha = 40.0, 3e4, -0.5
    tokens = [1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6]
    report = scaling.fit_all(synthetic("x", tokens, [e + a * t**alpha for t in tokens]), [1e7], "offset")
    offset = report.fits[0].offset
    assert offset is not None
    assert offset.E == pytest.approx(e, rel=1e-2)
    assert offset.A == pytest.approx(a, rel=1e-2)
    assert offset.alpha == pytest.approx(alpha, rel=1e-2)
    assert offset.predictions[0].ppl == pytest.approx(e + a * 1e7**alpha, rel=1e-2)


def test_offset_form_is_robust_to_one_bad_run() -> None:
    tokens = [1e3 * 2**k for k in range(8)]
    ppls = [40 + 3e4 * t**-0.5 for t in tokens]
    ppls[3] *= 1.3  # one run 30 % off: drags the least-squares power law, not the Huber offset fit
    offset = scaling.fit_offset("x", tokens, ppls, [])
    assert offset.alpha == pytest.approx(-0.5, rel=2e-2) and offset.E == pytest.approx(40, rel=5e-2)


def test_offset_form_needs_four_token_counts() -> None:
    points = synthetic("tiny", [1e3, 2e3, 4e3], [100.0, 80.0, 65.0])
    with pytest.raises(DataError, match="tiny"):
        scaling.fit_all(points, [], "offset")


# -- JSON shape ----------------------------------------------------------------------------------
def test_json_shape_is_exact() -> None:
    points, _ = scaling.load_points([SEED])
    power = scaling.report_to_json(scaling.fit_all(points, [1e6], "power"))
    assert set(power) == {"sources", "fits", "warnings"} and power["sources"] == [str(SEED)]
    fit = power["fits"][0]
    keys = {"model", "alpha", "A", "r2", "points", "sizes", "seeds", "doubling_reduction", "alpha_ci", "predictions",
            "offset"}
    assert set(fit) == keys and fit["offset"] is None
    assert set(fit["predictions"][0]) == {"tokens", "ppl", "pi", "extrapolation"}
    assert [f["model"] for f in power["fits"]] == sorted(f["model"] for f in power["fits"])
    four = [p for p in points if p.model.startswith("2025")]
    offset = scaling.report_to_json(scaling.fit_all(four, [1e6], "offset"))
    assert set(offset["fits"][0]["offset"]) == {"E", "A", "alpha", "predictions"}
    assert offset["fits"][0]["offset"]["predictions"][0]["pi"] is None
    json.dumps(offset, allow_nan=False)


# -- loading and bad input -------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model,samples,val_ppl\nA,1,2\n", "missing column(s) tokens"),
        ("model,tokens,val_ppl\nA,100,0\n", "row 2: val_ppl must be finite and positive"),
        ("model,tokens,val_ppl\nA,100,5\nA,-3,5\n", "row 3: tokens must be finite and positive"),
        ("model,tokens,val_ppl\nA,100,inf\n", "val_ppl must be finite"),
        ("model,tokens,val_ppl\nA,many,5\n", "tokens is not a number"),
        ("model,tokens,val_ppl\nA,100,5\nA," + "9" * 400 + ",4\n", "row 3: tokens must be finite"),
        ("model,tokens,val_ppl\nA,nan,5\n", "row 2: tokens must be finite"),
        ("model,train_tokens,val_ppl\nA,1e999,5\n", "row 2: train_tokens must be finite"),
        ("", "empty"),
        ("model,tokens,val_ppl\n", "empty"),
    ],
)
def test_bad_csv_is_one_line_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(DataError) as caught:
        scaling.load_points([write(tmp_path / "t.csv", text)])
    message = str(caught.value)
    assert needle in message and "t.csv" in message and "\n" not in message


def test_csv_from_a_spreadsheet_with_bom_and_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffmodel,tokens,val_ppl,fingerprint\nA,100,5,abc\nA,200,4,\n".encode())
    points, _ = scaling.load_points([path])
    expected = [("A", 100, 5, "abc"), ("A", 200, 4, None)]
    assert [(p.model, p.tokens, p.ppl, p.fingerprint) for p in points] == expected


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "results.jsonl", '{"model": "A", "train_tokens": 10, "val_ppl": 3}\n{oops\n')
    with pytest.raises(DataError, match=r"results.jsonl:2: not valid JSON"):
        scaling.load_points([path])
    write(path, '{"model": "A", "train_tokens": true, "val_ppl": 3}\n')
    with pytest.raises(DataError, match=r":1: train_tokens is not a number"):
        scaling.load_points([path])


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"model": "A", "train_tokens": 1' + "0" * 400 + ', "val_ppl": 3}', ":2: train_tokens must be finite"),
        ("[" * 100_000, ":2: not a results record (nested too deeply)"),
        ('{"model": "A", "train_to', ":2: not valid JSON"),
    ],
)
def test_damaged_jsonl_names_the_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = write(tmp_path / "results.jsonl", '{"model": "A", "train_tokens": 10, "val_ppl": 3}\n' + line + "\n")
    with pytest.raises(DataError) as caught:
        scaling.load_points([path])
    assert f"{path}{needle}" in str(caught.value)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"model": "A", "train_tokens": 10, "val_ppl": 3}\n{"model": "\xff"}\n')
    with pytest.raises(DataError, match=r"cannot read .*results\.jsonl: line 2 is not UTF-8 text"):
        scaling.load_points([path])


def test_a_runs_results_csv_is_a_source(tmp_path: Path) -> None:
    path = write(tmp_path / "results.csv", "model,samples,train_tokens,val_tokens,val_ppl,val_acc\n"
                                           "A,10,1000,50,90.5,0.1\nA,20,2000,50,70.25,0.2\n")
    points, _ = scaling.load_points([path])
    assert [(p.model, p.tokens, p.ppl) for p in points] == [("A", 1000, 90.5), ("A", 2000, 70.25)]


def test_repeated_points_are_counted_once_with_a_warning(tmp_path: Path) -> None:
    rows = "model,tokens,val_ppl\nA,1000,90\nA,2000,70\nA,4000,55\n"
    first, second = write(tmp_path / "a.csv", rows), write(tmp_path / "b.csv", rows + "A,8000,45\n")
    points, warnings = scaling.load_points([first, second])
    assert sorted(p.tokens for p in points) == [1000, 2000, 4000, 8000]
    assert all(p.source == str(first) for p in points if p.tokens < 8000)
    assert warnings == [f"{second} lists 3 point(s) from {first} again (A at 1,000 tokens, A at 2,000 tokens, "
                        f"A at 4,000 tokens); each is counted once"]
    same = write(tmp_path / "c.csv", rows + "A,1000,90\n")
    points, warnings = scaling.load_points([same])
    assert len(points) == 3 and warnings == [f"{same} lists 1 point(s) more than once (A at 1,000 tokens); "
                                             f"each is counted once"]


def test_a_run_directory_and_its_results_csv_are_one_source(tmp_path: Path) -> None:
    folder = run_dir(tmp_path, "r1", {"corpus": "aaa"})
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    write(folder / "results.csv", "model,samples,train_tokens,val_ppl\n" + "".join(
        f"{r['model']},{r['samples']},{r['train_tokens']},{r['val_ppl']}\n" for r in rows))
    points, warnings = scaling.load_points([folder, folder / "results.csv"])
    assert len(points) == 2 and len(warnings) == 1 and "counted once" in warnings[0]
    assert scaling.check_comparable(points, allow_mixed=False) == []


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*nope\.csv"):
        scaling.load_points([tmp_path / "nope.csv"])
    with pytest.raises(DataError, match=r"no results\.jsonl"):
        scaling.load_points([tmp_path])
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match=r"cannot read .*bin\.csv"):
        scaling.load_points([binary])


def test_single_token_count_is_an_error_naming_the_model() -> None:
    with pytest.raises(DataError, match="model flat: needs at least 2 distinct token counts"):
        scaling.fit_all(synthetic("flat", [1e3, 1e3], [100.0, 90.0]), [], "power")


def test_bad_prediction_count() -> None:
    with pytest.raises(DataError, match="--predict"):
        scaling.fit_all(synthetic("x", [1e3, 2e3], [100.0, 80.0]), [0.0], "power")


def run_dir(root: Path, name: str, fingerprints: dict[str, str], ppls: tuple[float, float] = (90.0, 70.0)) -> Path:
    folder = root / "exp" / name
    folder.mkdir(parents=True)
    rows = [{"model": "A", "train_tokens": t, "val_ppl": p, "samples": 1, "fingerprints": fingerprints}
            for t, p in zip((1000, 2000), ppls, strict=True)]
    write(folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_run_dirs_fingerprints_and_latest(tmp_path: Path) -> None:
    first = run_dir(tmp_path, "r1", {"corpus": "aaa", "tokenizer": "t"})
    second = run_dir(tmp_path, "r2", {"tokenizer": "t", "corpus": "aaa"}, (91.0, 71.0))  # another run's numbers
    other = run_dir(tmp_path, "r3", {"corpus": "bbb", "tokenizer": "t"})
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    os.utime(other, (3, 3))
    assert scaling.latest_run_dir(tmp_path) == (other, [])
    points, warnings = scaling.load_points([first, second / "results.jsonl", first])
    assert len(points) == 4 and warnings == [f"{first / 'results.jsonl'} was given twice; read once"]
    assert scaling.check_comparable(points, allow_mixed=False) == []  # key order does not matter
    mixed, _ = scaling.load_points([first, other])
    with pytest.raises(UserError, match="not comparable; pass --allow-mixed"):
        scaling.check_comparable(mixed, allow_mixed=False)
    collected: list[str] = []
    scaling.check_comparable(mixed, allow_mixed=True, warnings=collected)
    assert len(collected) == 1 and "--allow-mixed" in collected[0]
    with pytest.raises(DataError, match="run `newllm-kit run` first"):
        scaling.latest_run_dir(tmp_path / "empty")


def failed_run(root: Path, name: str, with_results: bool) -> Path:
    folder = run_dir(root, name, {"corpus": "aaa"}) if with_results else root / "exp" / name
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "config.resolved.toml", "")
    write(folder / "meta.json", json.dumps({"status": "failed", "error": "phase 1: non-finite loss"}))
    return folder


def test_latest_run_skips_newer_failed_or_empty_runs_and_says_so(tmp_path: Path) -> None:
    good = run_dir(tmp_path, "r1", {"corpus": "aaa"})
    partial = failed_run(tmp_path, "r2", with_results=True)
    empty = failed_run(tmp_path, "r3", with_results=False)
    for age, folder in enumerate((good, partial, empty)):
        os.utime(folder, (age, age))
    latest, notes = scaling.latest_run_dir(tmp_path)
    assert latest == good
    assert notes == [f"skipped {empty}: this run failed before any unit finished (see meta.json)",
                     f"skipped {partial}: this run failed (see meta.json); pass it as a SOURCE to fit the units "
                     f"it finished"]
    shutil.rmtree(good)
    with pytest.raises(DataError, match=rf"no run with finished units under .*\(the latest, {empty}: this run "
                                        rf"failed before any unit finished \(see meta.json\)\)"):
        scaling.latest_run_dir(tmp_path)


def test_a_run_that_failed_before_any_unit_finished_says_so(tmp_path: Path) -> None:
    empty = failed_run(tmp_path, "r1", with_results=False)
    with pytest.raises(DataError, match=r"this run failed before any unit finished \(see meta.json\)$"):
        scaling.load_points([empty])
    write(empty / "meta.json", json.dumps({"status": "interrupted"}))
    with pytest.raises(DataError, match=r"no unit of this run has finished yet \(status 'interrupted'"):
        scaling.load_points([empty])
    partial = failed_run(tmp_path, "r2", with_results=True)
    points, warnings = scaling.load_points([partial])
    assert len(points) == 2 and warnings == [f"{partial}: this run failed (see meta.json); fitting the units it "
                                             f"finished"]


# -- rendering and plotting --------------------------------------------------------------------------
def test_render_shows_fits_predictions_comparison_and_warnings() -> None:
    points, _ = scaling.load_points([SEED])
    console = Console(record=True, width=160, color_system=None)
    scaling.render(scaling.fit_all(points, [5e5], "power"), console)
    text = console.export_text()
    needles = (f"source: {SEED}", "v2-A", "-18.4%", "419.9", "Steepest α: 2025-11-27-6L", "lowest predicted PPL",
               "not every α has an interval", "a third training size gives one", "warning:")
    for needle in needles:
        assert needle in text, needle


def test_render_prints_model_names_and_warnings_as_text_not_markup() -> None:
    points = [*synthetic("[/x]", [1e3, 2e3], [100.0, 80.0]), *synthetic("[bold red]X", [1e3, 2e3], [100.0, 90.0])]
    console = Console(record=True, width=160, color_system=None)
    scaling.render(scaling.fit_all(points, [5e3], "power"), console)
    text = console.export_text()
    for needle in ("│ [/x]", "│ [bold red]X", "Steepest α: [/x]", "lowest predicted PPL is [/x]",
                   "warning: model [bold red]X: 2 points"):
        assert needle in text, needle


def test_render_fits_an_80_column_terminal_without_truncating() -> None:
    points, _ = scaling.load_points([SEED])
    console = Console(record=True, width=80, color_system=None)
    scaling.render(scaling.fit_all(points, [5e5], "power"), console)
    text = console.export_text()
    for needle in ("2025-11-27-3L", "2,265,648", "-1.011…-0.418", "685.6"):
        assert needle in text, needle


def test_plot_writes_a_png_atomically(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    points, _ = scaling.load_points([SEED])
    target = tmp_path / "fit.png"
    scaling_plot.plot(scaling.fit_all(points, [5e5, 1e6], "power"), points, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fit.png"]


def test_plot_without_matplotlib_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = scaling.fit_all(synthetic("x", [1e3, 2e3], [100.0, 80.0]), [], "power")
    with pytest.raises(UserError, match=r"pip install 'newllm-kit\[plot\]'"):
        scaling_plot.plot(report, [], tmp_path / "fit.png")


@pytest.mark.parametrize("target", [".", "missing/fit.png"])
def test_plot_to_a_folder_or_into_a_missing_folder_is_a_user_error(tmp_path: Path, target: str) -> None:
    report = scaling.fit_all(synthetic("x", [1e3, 2e3], [100.0, 80.0]), [], "power")
    with pytest.raises(UserError, match=r"^--plot: .*(is a folder|does not exist)"):
        scaling_plot.plot(report, [], tmp_path / target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("lo", "hi", "ticks"), [
    (3.0, 12_000.0, [10, 100, 1000, 10_000]),
    (168.0, 293.0, [180, 200, 220, 240, 260, 280]),
    (24_000.0, 60_000.0, [30_000, 40_000, 50_000]),
    (181.0, 186.0, [181, 182, 183, 184, 185, 186]),
])
def test_plot_ticks_are_round_numbers_inside_the_axis(lo: float, hi: float, ticks: list[float]) -> None:
    assert scaling_plot.log_ticks(lo, hi) == ticks


def test_plot_limits_keep_points_off_the_frame_and_labels_are_plain(tmp_path: Path) -> None:
    lo, hi = scaling_plot.log_limits([181.5, 185.6])
    # two close points sit inside, not in the corners: widened to a 1.5× span about their geometric
    # centre, then padded by 10 % of that span on each side
    assert (hi / lo, lo * hi) == (pytest.approx(1.5**1.2, rel=1e-12), pytest.approx(181.5 * 185.6, rel=1e-12))
    lo, hi = scaling_plot.log_limits([100.0, 1000.0])
    assert lo == pytest.approx(100 / 10**0.1) and hi == pytest.approx(1000 * 10**0.1)
    assert [scaling_plot.tokens_label(t) for t in (500, 30_000, 1e6, 2.5e6)] == ["500", "30k", "1M", "2.5M"]
    run = tmp_path / "runs" / "quickstart" / "20261201-1"
    run.mkdir(parents=True)
    write(run / "config.resolved.toml", "")
    assert scaling_plot.title([str(run / "results.jsonl"), str(tmp_path / "results.csv")]) == (
        "quickstart, run 20261201-1; results.csv")
