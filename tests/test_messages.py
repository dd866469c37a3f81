"""What a user reads: help that keeps its placeholders, `compare` refusing what it cannot compare, a
results table that keeps every column off a terminal, one convention for missing values, offset fits
per model, marked extrapolations, PNG permissions, `params` counting what a run trains, and plots
that say when there is nothing to draw."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from newllm_kit import cli, scaling, scaling_plot
from newllm_kit.compare import compare, render
from newllm_kit.errors import DataError, UserError
from newllm_kit.params import count_params, load_table
from newllm_kit.report import print_results
from newllm_kit.rundir import RunDir
from newllm_kit.scaling import Point

PRINTS = {"corpus": "c1", "tokenizer": "t1", "split": "s1"}


# --- help ---------------------------------------------------------------------------------------

def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_plot_help_shows_the_run_directory_placeholders() -> None:
    result = CliRunner().invoke(cli.app, ["plot", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "A run directory (runs/<experiment>/<run>)." in result.output


def test_no_command_help_eats_an_angle_bracket_placeholder() -> None:
    import typer

    root = typer.main.get_command(cli.app)
    checked = 0
    for path, command in _commands(root):
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        wanted = {m for text in texts for m in re.findall(r"<[^<>\s]+>", text)}
        result = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
        assert result.exit_code == 0, (path, result.output)
        for placeholder in wanted:
            assert placeholder in result.output, (path, placeholder)
            checked += 1
    assert checked >= 2  # runs/<experiment>/<run> at least


def test_readme_command_table_lists_every_command() -> None:
    import typer

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for path, _ in _commands(typer.main.get_command(cli.app)):
        if path:
            assert f"| `newllm-kit {' '.join(path)}" in table, path


# --- compare ------------------------------------------------------------------------------------

def _write(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps({"fingerprints": PRINTS, **r}) + "\n"
                                                  for r in records))
    return folder


def _record(model: str, seed: int, ppl: float, samples: int = 100, **extra: Any) -> dict[str, Any]:
    return {"model": model, "samples": samples, "seed": seed, "train_tokens": samples * 50, "val_ppl": ppl,
            "val_acc": 0.1, **extra}


def _main(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`newllm-kit ARGV` in this process, through the console script's error handling: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["newllm-kit", *argv])
    monkeypatch.setattr(cli, "_register_plugin_commands", lambda: None)
    monkeypatch.setitem(cli._state, "plugins", SimpleNamespace(problems=lambda: []))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    return int(stopped.value.code or 0), capsys.readouterr().err


def test_one_model_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = _write(tmp_path / "r", [_record("A", s, 300.0 + s) for s in (1, 2, 3)])
    code, err = _main(["compare", str(run)], monkeypatch, capsys)
    assert code == 2
    assert err.strip() == "error: --by model: these results have one model (A), nothing to compare it with"


def test_a_metric_only_one_side_recorded_is_refused(tmp_path: Path) -> None:
    records = [_record("A", s, 300.0, val_er=0.4) for s in (1, 2)] + [_record("B", s, 310.0) for s in (1, 2)]
    with pytest.raises(UserError, match=r"^--metric val_er: only A recorded it, not B; "):
        compare([_write(tmp_path / "r", records)], "val_er", "model", False)


def test_one_seed_says_no_test_was_possible(tmp_path: Path) -> None:
    document = compare([_write(tmp_path / "r", [_record("A", 1, 300.0), _record("B", 1, 310.0)])], "val_ppl",
                       "model", False)
    (only,) = document["comparisons"]
    assert only["method"] == "none" and only["ci"] is None
    console = Console(record=True, width=120, color_system=None)
    render(document, console)
    text = console.export_text()
    assert "no test" in text and "welch │" not in text and "│ welch" not in text


def _column(text: str, index: int) -> str:
    """The cells of column `index` of a boxed rich table's body, joined: a folded name read whole."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    body = [line for line in lines[start + 1:] if line.startswith("│")]
    return "".join(line.split("│")[index + 1].strip() for line in body)


def test_long_variant_names_are_shown_whole_and_sides_are_not_lettered(tmp_path: Path) -> None:
    low, high = "drw-0.3_lr-0.001_layers-3", "drw-0.3_lr-0.001_layers-6"
    records = [_record("A", s, 300.0 + s + (5 if v == high else 0), variant=v) for v in (low, high) for s in (1, 2)]
    console = Console(record=True, width=80, color_system=None)
    render(compare([_write(tmp_path / "r", records)], "val_ppl", "variant", False), console)
    text = console.export_text()
    assert "…" not in re.sub(r"CI [^)…]*… [^)]*\)", "", text)  # rich's ellipsis: a cut cell (not an interval's)
    assert (_column(text, 1), _column(text, 2)) == (low, high)
    header = next(line for line in text.splitlines() if "Where" in line)
    assert "First" in header and "Second" in header and not re.search(r"┃ [AB] +┃", header)


# --- the results table --------------------------------------------------------------------------

CVFP_COLUMNS = [["train_er", "Train ER", True, True], ["phase1_iterations", "Phase-1 it.", False, False],
                ["best_epoch", "Best epoch", False, False]]
METRICS = [{"name": "ppl", "key": "val_ppl", "unit": "perplexity", "direction": "min"},
           {"name": "accuracy", "key": "val_acc", "unit": "fraction", "direction": "max"},
           {"name": "effective_rank", "key": "val_er", "unit": "fraction of width", "direction": "max"},
           {"name": "convergence_rate", "key": "convergence_rate", "unit": "fraction of tokens", "direction": "max"}]


def test_a_table_wider_than_a_pipe_keeps_every_column_and_value() -> None:
    record = {"model": "cvfp-3L", "variant": "drw-0.3_lr-0.001", "samples": 12_000, "train_tokens": 1_529_433,
              "val_ppl": 1234.5678, "val_acc": 0.1234, "val_er": 0.3, "convergence_rate": 0.961, "train_er": 0.5,
              "phase1_iterations": 107, "best_epoch": 9, "columns": CVFP_COLUMNS}
    lm = {"model": "transformer", "samples": 12_000, "train_tokens": 1_529_433, "val_ppl": 222.25, "val_acc": 0.2,
          "best_epoch": 3, "epochs_run": 4,
          "columns": [["best_epoch", "Best epoch", False, False], ["epochs_run", "Epochs", False, False]]}
    out = io.StringIO()
    console = Console(file=out, width=80)  # what a file or a pipe gets: not a terminal, 80 columns
    assert not console.is_terminal
    print_results(console, {"experiment": "v2", "run_dir": "runs/v2/x", "results": [record, lm], "metrics": METRICS})
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    words = " ".join(text.split())
    for needle in ("cvfp-3L@drw-0.3_lr-0.001", "transformer", "1,529,433", "1234.57", "222.25", "12.3%", "30.0%",
                   "96.1%", "50.0%", "107", "9", "Train", "ER", "Phase-1", "it.", "Best", "epoch", "Epochs", "Conv."):
        assert needle in words, needle
    lm_rows = [line.split() for line in text.splitlines() if line.startswith("transformer")]
    assert ["3", "4"] == lm_rows[-1][-2:]  # its last columns keep their values


def test_a_missing_value_is_a_dash_in_the_table_and_an_empty_csv_cell(tmp_path: Path) -> None:
    records = [{"model": "A", "samples": 10, "train_tokens": 100, "val_ppl": 8.0, "val_acc": 0.5,
                "train_er": float("nan"), "columns": CVFP_COLUMNS[:1]},
               {"model": "T", "samples": 10, "train_tokens": 100, "val_ppl": 4.0, "val_acc": 0.6}]
    run = RunDir(tmp_path)
    run.write_results(records, ["model", "samples", "train_tokens", "val_ppl", "val_acc", "train_er"])
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [row["train_er"] for row in rows] == ["", ""]
    console = Console(record=True, width=120, color_system=None)
    print_results(console, {"experiment": "e", "run_dir": "r", "results": records})
    table = {line.split()[0]: line.split() for line in console.export_text().splitlines()
             if line[:2] in ("A ", "T ")}
    assert table["A"][-1] == "—" and table["T"][-1] == "—"


# --- scaling ------------------------------------------------------------------------------------

def _points(model: str, tokens: list[float], alpha: float = -0.3) -> list[Point]:
    return [Point(model, t, 50.0 + 5000.0 * t**alpha, None, "x.csv") for t in tokens]


def test_offset_form_fits_the_models_with_four_sizes_and_warns_about_the_others() -> None:
    points = _points("four", [1e3, 2e3, 4e3, 8e3]) + _points("three", [1e3, 2e3, 4e3])
    report = scaling.fit_all(points, [2e4], "offset")
    fits = {f.model: f for f in report.fits}
    assert fits["four"].offset is not None and fits["four"].offset.E == pytest.approx(50.0, rel=1e-3)
    three = [(p.tokens, p.ppl) for p in points if p.model == "three"]
    slope = np.polyfit(np.log([t for t, _ in three]), np.log([v for _, v in three]), 1)[0]  # the power form's α
    assert fits["three"].offset is None and fits["three"].alpha == pytest.approx(slope, rel=1e-9)
    assert any(w.startswith("model three: 3 training sizes; the offset form needs at least 4") for w in report.warnings)
    console = Console(record=True, width=120, color_system=None)
    scaling.render(report, console)
    predicted = [line.split("│") for line in console.export_text().splitlines() if line.startswith("│ three ")][-1]
    assert predicted[-2].strip() == "—"  # its offset-form prediction
    with pytest.raises(DataError, match="no model has them"):
        scaling.fit_all(_points("three", [1e3, 2e3, 4e3]), [], "offset")


def test_an_extrapolated_prediction_is_labelled_on_the_picture() -> None:
    pytest.importorskip("matplotlib")
    points = [Point("A", 30_000.0, 400.0, None, "x.csv"), Point("A", 61_000.0, 330.0, None, "x.csv")]
    report = scaling.fit_all(points, [5e6, 50_000.0])
    texts = [t.get_text() for t in scaling_plot.scaling_figure(report, points).axes[0].texts]
    assert texts == ["extrapolated ×82"]  # the prediction inside the measured range gets no label


def test_a_band_wider_than_the_axes_is_said_to_be_clipped() -> None:
    pytest.importorskip("matplotlib")
    points = [Point("B", t, p, None, "x.csv", s)
              for s, (t, p) in enumerate([(3e4, 400.0), (3e4, 300.0), (6e4, 330.0), (6e4, 200.0)])]
    texts = [t.get_text() for t in scaling_plot.scaling_figure(scaling.fit_all(points, []), points).axes[0].texts]
    assert len(texts) == 1 and texts[0].startswith("95% band wider than the axes, clipped (B: PPL ")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_png_gets_the_umask_permissions(tmp_path: Path, umask_022: None) -> None:
    pytest.importorskip("matplotlib")
    points = _points("A", [1e3, 2e3, 4e3])
    scaling_plot.plot(scaling.fit_all(points, []), points, tmp_path / "fit.png")
    assert stat.S_IMODE((tmp_path / "fit.png").stat().st_mode) == 0o644


# --- params -------------------------------------------------------------------------------------

class _LazyTable(nn.Module):
    """A plugin model whose table stays frozen until `set_embedding` says otherwise."""

    vocab_size, embedding_dim = 11, 4

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(self.vocab_size, self.embedding_dim)
        self.embedding.weight.requires_grad_(False)
        self.body = nn.Linear(self.embedding_dim, self.embedding_dim)

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        load_table(self.embedding.weight, weight, trainable=not freeze)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"train": [p for p in self.parameters() if p.requires_grad]}

    def param_counts(self) -> dict[str, int]:
        return {"embedding": self.embedding.weight.numel(), "body": 20, "total": self.embedding.weight.numel() + 20}


def _config(freeze: bool) -> Any:
    architecture = SimpleNamespace(build=lambda vocab_size: _LazyTable())
    tokenizer = SimpleNamespace(build=lambda: SimpleNamespace(expected_vocab_size=11))
    return SimpleNamespace(tokenizer=tokenizer, models=[("L", SimpleNamespace(build=lambda: architecture))],
                           schema=SimpleNamespace(embedding=SimpleNamespace(freeze=freeze)), path="x.toml")


@pytest.mark.parametrize(("freeze", "trainable"), [(False, 44 + 20), (True, 20)])
def test_params_counts_the_table_as_the_run_trains_it(freeze: bool, trainable: int) -> None:
    (row,) = count_params(cast(Any, _config(freeze)))
    assert row["trainable"] == {"train": trainable} and row["total"] == 64


# --- plots --------------------------------------------------------------------------------------

def test_a_unit_without_curve_fields_gets_a_picture_that_says_so() -> None:
    pytest.importorskip("matplotlib")
    from newllm_kit.plots import NO_CURVES, model_figure, unit_figure

    rows = [{"unit": "U-10", "phase": "count", "step": k, "tokens_seen": 10 * k} for k in (1, 2)]
    rows += [{"unit": "U-10", "phase": "score", "epoch": 1, "bits": 3.0}]  # an epoch, but no loss
    curves = {"count": rows[:2], "score": rows[2:]}
    record = {"model": "U", "samples": 10, "train_tokens": 100, "val_ppl": 50.0, "seed": 1}
    figure = unit_figure(record, "U-10", curves)
    (ax,) = figure.axes
    assert [t.get_text().splitlines()[0] for t in ax.texts] == [NO_CURVES]
    model = model_figure("U", [record], {"U-10": curves}, False)
    assert [t.get_text().startswith("no curves: no unit of this model") for t in model.axes[0].texts] == [True]
