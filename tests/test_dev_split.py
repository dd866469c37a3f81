"""A development split: `[data] dev` rows, disjoint from training and validation, that every recipe
early-stops on, so that the validation rows are scored once, by the weights the unit ends on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fixtures import ids_sha256, synthetic_experiment, synthetic_ids
from test_kept_models import MIXED

from newllm_kit.config import load_config
from newllm_kit.corpus import Split
from newllm_kit.errors import DataError
from newllm_kit.evaluation import evaluate_run
from newllm_kit.plugins import load_plugins
from newllm_kit.preflight import check_before_data
from newllm_kit.run import execute

VAL = "val = { start = 300, count = 12 }"
DEV = MIXED.replace(VAL, f"{VAL}\ndev = {{ start = 330, count = 10 }}")
UNITS = ("A-24", "T-24", "G-24")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dev")
    (folder / "dev.toml").write_text(DEV)
    return Path(execute(folder / "dev.toml", [], folder / "runs", False, "none", load_plugins())["run_dir"])


def record(run_dir: Path, unit: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((run_dir / "units" / unit / "record.json").read_text())
    return loaded


def epoch_rows(run_dir: Path, unit: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["unit"] == unit and "epoch" in r]


def test_every_recipe_selects_its_epoch_on_the_development_rows(run_dir: Path) -> None:
    for unit in UNITS:
        r, rows = record(run_dir, unit), epoch_rows(run_dir, unit)
        assert r["early_stopping"] == "dev" and r["dev_tokens"] == synthetic_ids(range(330, 340)).size
        assert rows and all("dev_loss" in row and "val_loss" not in row for row in rows)
        losses = [row["dev_loss"] for row in rows]
        assert r["best_epoch"] == 1 + losses.index(min(losses)), unit
        assert math.isclose(r["dev_ppl"], math.exp(min(losses)), rel_tol=1e-12), unit
        assert r["val_tokens"] != r["dev_tokens"]


def test_the_validation_rows_are_scored_once_by_the_weights_the_unit_ends_on(run_dir: Path) -> None:
    lines = evaluate_run(run_dir, None, "best", [], load_plugins().registry, None, print)
    for line in lines:
        assert math.isclose(line["val_ppl"], record(run_dir, line["unit"])["val_ppl"], rel_tol=1e-9), line["unit"]
        assert line["val_ppl"] != record(run_dir, line["unit"])["dev_ppl"]


def test_the_development_rows_are_pinned_with_the_run(run_dir: Path) -> None:
    fingerprints = json.loads((run_dir / "meta.json").read_text())["fingerprints"]
    assert {key: fingerprints[key] for key in ("train_ids", "dev_ids", "val_ids")} == {
        "train_ids": ids_sha256(synthetic_ids(range(24))), "dev_ids": ids_sha256(synthetic_ids(range(330, 340))),
        "val_ids": ids_sha256(synthetic_ids(range(300, 312)))}


def test_without_dev_rows_early_stopping_reads_validation_and_says_so(tmp_path: Path) -> None:
    text = synthetic_experiment("plain", "[12]") + """
[lm]
epochs = 2
batch_size = 4
window = 16
warmup_steps = 1

[[models]]
label = "G"
architecture = "gru"
layers = 1
hidden_size = 8
embedding_dim = 8
"""
    (tmp_path / "plain.toml").write_text(text)
    result = execute(tmp_path / "plain.toml", [], tmp_path / "runs", False, "none", load_plugins())
    (r,) = result["results"]
    assert r["early_stopping"] == "val" and "dev_ppl" not in r and "dev_tokens" not in r
    assert all("val_loss" in row for row in epoch_rows(Path(result["run_dir"]), "G-12"))


def test_development_rows_that_overlap_another_split_are_refused_before_any_data(tmp_path: Path) -> None:
    registry = load_plugins().registry
    for rows, overlaps in (("{ start = 305, count = 10 }", "validation"), ("{ start = 10, count = 5 }", "training")):
        (tmp_path / "bad.toml").write_text(DEV.replace("dev = { start = 330, count = 10 }", f"dev = {rows}"))
        with pytest.raises(DataError, match=f"development rows .* overlap {overlaps} rows"):
            check_before_data(load_config(tmp_path / "bad.toml", registry))


def test_the_split_fingerprint_names_dev_rows_only_where_there_are_some() -> None:
    plain = Split.of(0, 24, 300, 12).fingerprint("first_turn", "c")
    assert Split.of(0, 24, 300, 12, None).fingerprint("first_turn", "c") == plain
    with_dev = Split.of(0, 24, 300, 12, (330, 10)).fingerprint("first_turn", "c")
    assert with_dev != plain != Split.of(0, 24, 300, 12, (331, 10)).fingerprint("first_turn", "c")


def test_the_training_curves_draw_the_development_loss_and_star_its_best_epoch(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from newllm_kit.plots import run_curves, unit_figure

    curves = run_curves(run_dir)["T-24"]
    figure = unit_figure(record(run_dir, "T-24"), "T-24", curves)
    assert [ax.get_title() for ax in figure.axes] == ["lm: train and development loss"]
    labels = [str(line.get_label()) for line in figure.axes[0].get_lines()]
    best = record(run_dir, "T-24")["best_epoch"]
    assert "development" in labels and any(label.startswith(f"best epoch ({best}: dev PPL") for label in labels)
