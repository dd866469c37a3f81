"""`newllm-kit plot`: which PNGs a run gets, which metrics rows they read, which panels a recipe's phases
give, and what happens without matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli

from newllm_kit.errors import DataError, UserError
from newllm_kit.plots import flops_figure, model_figure, read_curves, sweep_metrics, unit_figure, write_plots

PNG = b"\x89PNG\r\n\x1a\n"
EPOCHS = (1, 2, 3)


def cvfp_rows(unit: str) -> list[dict[str, Any]]:
    """What the cvfp recipe logs: "phase1" iterations with loss and converged share, then "phase2" epochs."""
    return ([{"unit": unit, "phase": "phase1", "attempt": 1, "iteration": k, "loss": 1 / k, "rate": min(0.3 * k, 1.0)}
             for k in (1, 2, 3, 4)] + epoch_rows(unit, "phase2"))


def epoch_rows(unit: str, phase: str) -> list[dict[str, Any]]:
    """What `train_epochs` logs for `phase`; epoch 2 is the best."""
    return [{"unit": unit, "phase": phase, "attempt": 1, "epoch": e, "train_loss": 6 - e,
             "val_loss": 6 - e + (e == 3), "val_ppl": 400.0} for e in EPOCHS]


def record(model: str, samples: int, seed: int, ppl: float, recipe: str = "cvfp") -> dict[str, Any]:
    base = {"model": model, "samples": samples, "seed": seed, "train_tokens": samples * 40, "val_ppl": ppl,
            "val_acc": 0.1, "best_epoch": 2, "recipe": recipe}
    if recipe == "cvfp":
        base |= {"train_er": 0.5, "val_er": 0.4, "phase1_target_rate": 0.95}
    return base


def fake_run(folder: Path, seeds: list[int], lm: bool = False) -> Path:
    """A run directory as `run` leaves it: config, two cvfp models (and an lm one) × two sizes × `seeds`,
    their curves."""
    folder.mkdir(parents=True)
    (folder / "config.resolved.toml").write_text(f"[experiment]\nname = \"fake\"\nseeds = {seeds}\n")
    records, metrics = [], []
    for model, base in (("A", 300.0), ("B", 320.0), *((("LM", 280.0),) if lm else ())):
        for samples in (100, 200):
            for seed in seeds:
                unit = f"{model}-{samples}" + (f"-s{seed}" if len(seeds) > 1 else "")
                recipe = "lm" if model == "LM" else "cvfp"
                records.append(record(model, samples, seed, base * (samples / 100) ** -0.3 + seed, recipe))
                metrics += epoch_rows(unit, "lm") if recipe == "lm" else cvfp_rows(unit)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def curves_of(rows: list[dict[str, Any]], tmp_path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_curves(path)


def panel_titles(figure: Any) -> list[str]:
    """The figure's panels, by title: a twin axis (the converged share) has none."""
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def target_lines(figure: Any) -> list[str]:
    return [line.get_label() for ax in figure.axes for line in ax.get_lines()
            if str(line.get_label()).startswith("target")]


@pytest.mark.slow
def test_every_unit_model_and_the_fit_get_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", [1, 2], lm=True)
    written = write_plots(run)
    names = sorted(p.name for p in written)
    units = [f"unit-{m}-{n}-s{s}.png" for m in ("A", "B", "LM") for n in (100, 200) for s in (1, 2)]
    assert names == sorted([*units, "model-A.png", "model-B.png", "model-LM.png", "scaling.png"])
    assert all(p.parent == run / "plots" and p.read_bytes()[:8] == PNG for p in written)


def test_a_resumed_step_counts_once_with_the_later_attempt(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"unit": "A-1", "phase": "phase2", "attempt": 1, "epoch": 1, "val_loss": 5.0},
            {"unit": "A-1", "phase": "phase2", "attempt": 2, "epoch": 1, "val_loss": 4.0},
            {"unit": "A-1", "phase": "phase2", "attempt": 2, "epoch": 2, "val_loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"unit": "A-1", "pha')
    curves = read_curves(path)
    assert [(r["epoch"], r["val_loss"]) for r in curves["A-1"]["phase2"]] == [(1, 4.0), (2, 3.0)]


def test_phases_keep_the_order_the_recipe_logged_them(tmp_path: Path) -> None:
    rows = [*epoch_rows("u", "warmup"), *cvfp_rows("u"), {"unit": "u", "phase": "note", "attempt": 1, "tokens": 5}]
    assert list(curves_of(rows, tmp_path)["u"]) == ["warmup", "phase1", "phase2"]  # "note" counts no step


def test_an_lm_unit_gets_one_panel_with_its_best_epoch_starred(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curves = curves_of(epoch_rows("LM-100", "lm"), tmp_path)["LM-100"]
    figure = unit_figure(record("LM", 100, 0, 300.0, recipe="lm"), "LM-100", curves)
    assert panel_titles(figure) == ["lm: train and validation loss"]
    assert "best epoch (2: val PPL 400.0)" in [line.get_label() for line in figure.axes[0].get_lines()]
    assert target_lines(figure) == []


def test_a_cvfp_unit_gets_two_panels_and_a_target_line_only_where_the_record_has_one(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curves = curves_of(cvfp_rows("A-100"), tmp_path)["A-100"]
    with_target = record("A", 100, 0, 300.0)
    figure = unit_figure(with_target, "A-100", curves)
    assert panel_titles(figure) == ["phase1: loss per iteration", "phase2: train and validation loss"]
    assert target_lines(figure) == ["target (95%)"]
    without = {k: v for k, v in with_target.items() if k != "phase1_target_rate"}
    assert target_lines(unit_figure(without, "A-100", curves)) == []
    assert target_lines(unit_figure({**with_target, "phase1_target_rate": None}, "A-100", curves)) == []


def test_the_best_epoch_is_starred_on_the_last_epoch_phase_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curves = curves_of([*epoch_rows("u", "warmup"), *epoch_rows("u", "lm")], tmp_path)["u"]
    figure = unit_figure(record("LM", 100, 0, 300.0, recipe="lm"), "u", curves)
    starred = [ax.get_title() for ax in figure.axes
               if any(str(line.get_label()).startswith("best epoch") for line in ax.get_lines())]
    assert starred == ["lm: train and validation loss"]


def test_the_model_figure_has_a_panel_per_phase_and_quantity(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curves = curves_of([*cvfp_rows("A-100"), *cvfp_rows("A-200"), *epoch_rows("LM-100", "lm")], tmp_path)
    cvfp = model_figure("A", [record("A", n, 0, 300.0) for n in (100, 200)], curves, False)
    assert panel_titles(cvfp) == ["phase1: loss", "phase1: share converged",
                                  "phase2: early-stopping loss (bold), train (faint), ★ best"]
    lm = model_figure("LM", [record("LM", 100, 0, 280.0, recipe="lm")], curves, False)
    assert panel_titles(lm) == ["lm: early-stopping loss (bold), train (faint), ★ best"]


def test_a_sweep_plots_val_ppl_the_configured_metrics_and_the_recipes_averaged_columns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    columns = [["train_er", "Train ER", True, True], ["best_epoch", "Best epoch", False, False]]
    cvfp = {**record("A", 100, 0, 300.0), "columns": columns, "metrics": {"ppl": 300.0, "effective_rank": 0.4}}
    lm = {**record("LM", 100, 0, 280.0, recipe="lm"), "columns": [["best_epoch", "Best epoch", False, False]],
          "metrics": {"ppl": 280.0, "effective_rank": 0.3}, "val_er": 0.3}

    def shown(records: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
        return [(m.key, m.header, m.percent) for m in sweep_metrics(run, records)]

    # without summary.json, the metric names the records carry, drawn as they are
    assert shown([lm]) == [("val_ppl", "validation PPL", False), ("val_er", "Val ER", False)]
    (run / "summary.json").write_text(json.dumps({"metrics": [
        {"name": "ppl", "key": "val_ppl", "unit": "perplexity", "direction": "min"},
        {"name": "effective_rank", "key": "val_er", "unit": "fraction of width", "direction": "max"}]}))
    assert shown([lm]) == [("val_ppl", "validation PPL", False), ("val_er", "Val ER ↑", True)]
    assert shown([cvfp, lm]) == [("val_ppl", "validation PPL", False), ("val_er", "Val ER ↑", True),
                                 ("train_er", "Train ER", True)]


def test_a_sweep_gets_a_png_per_swept_key(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    records, rows = [], []
    for rate in (0.01, 0.02):
        variant = f"lr-{rate}"
        records.append({**record("LM", 100, 0, 280.0 + 1000 * rate, recipe="lm"), "variant": variant,
                        "sweep": {"lm.learning_rate": rate}})
        rows += epoch_rows(f"{variant}-LM-100", "lm")
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = sorted(p.name for p in write_plots(run))
    assert names == ["model-LM@lr-0.01.png", "model-LM@lr-0.02.png", "sweep-lm.learning_rate.png",
                     "unit-lr-0.01-LM-100.png", "unit-lr-0.02-LM-100.png"]


def test_a_folder_without_results_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no results\.jsonl"):
        write_plots(tmp_path)
    with pytest.raises(UserError, match="not a run directory"):
        write_plots(tmp_path / "missing")


def test_without_matplotlib_it_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"newllm-kit plot needs matplotlib: pip install 'newllm-kit\[plot\]'"):
        write_plots(fake_run(tmp_path / "run", [1]))


@pytest.mark.slow
def test_cli_writes_to_out_and_lists_the_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", [7])
    result = cli("plot", str(run), "--out", str(tmp_path / "png"))
    assert result.returncode == 0, result.stderr
    assert "7 PNG files in" in result.stdout and "unit-A-100.png" in result.stdout
    assert (tmp_path / "png" / "scaling.png").read_bytes()[:8] == PNG



def test_ppl_against_training_flops_is_drawn_log_log_where_records_have_them(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", [1])
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert "scaling-flops.png" not in [p.name for p in write_plots(run, tmp_path / "old")]  # an older run: none
    for r in records[1:]:  # the first unit stands for one recorded before FLOPs were counted
        r["flops"] = {"total": r["samples"] * (3e9 if r["model"] == "A" else 5e9)}
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = {p.name: p for p in write_plots(run)}
    assert written["scaling-flops.png"].read_bytes()[:8] == PNG
    (ax,) = flops_figure(records, "run").axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log") and "FLOPs" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]
    assert ax.get_title() == "1 unit(s) without recorded FLOPs or PPL left out"
