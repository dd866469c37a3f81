"""`newllm-kit plot`: which PNGs a run gets, which metrics rows they read, and what happens without
matplotlib."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_cli import cli

from newllm_kit.errors import DataError, UserError
from newllm_kit.plots import read_curves, write_plots

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder: Path, seeds: list[int]) -> Path:
    """A run directory as `run` leaves it: config, two models × two sizes × `seeds`, their curves."""
    folder.mkdir(parents=True)
    (folder / "config.resolved.toml").write_text(f"[experiment]\nname = \"fake\"\nseeds = {seeds}\n")
    records, metrics = [], []
    for model, base in (("A", 300.0), ("B", 320.0)):
        for samples in (100, 200):
            for seed in seeds:
                unit = f"{model}-{samples}" + (f"-s{seed}" if len(seeds) > 1 else "")
                ppl = base * (samples / 100) ** -0.3 + seed
                records.append({"model": model, "samples": samples, "seed": seed, "train_tokens": samples * 40,
                                "val_ppl": ppl, "val_acc": 0.1, "train_er": 0.5, "val_er": 0.4, "best_epoch": 2,
                                "phase1_target_rate": 0.95})
                metrics += [{"unit": unit, "phase": "phase1", "attempt": 1, "iteration": k, "loss": 1 / k,
                             "rate": min(0.3 * k, 1.0)} for k in (1, 2, 3, 4)]
                metrics += [{"unit": unit, "phase": "phase2", "attempt": 1, "epoch": e, "train_loss": 6 - e,
                             "val_loss": 6 - e + (e == 3), "val_ppl": 400.0} for e in (1, 2, 3)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def test_every_unit_model_and_the_fit_get_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", [1, 2])
    written = write_plots(run)
    names = sorted(p.name for p in written)
    units = [f"unit-{m}-{n}-s{s}.png" for m in "AB" for n in (100, 200) for s in (1, 2)]
    assert names == sorted([*units, "model-A.png", "model-B.png", "scaling.png"])
    assert all(p.parent == run / "plots" and p.read_bytes()[:8] == PNG for p in written)


def test_a_resumed_step_counts_once_with_the_later_attempt(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"unit": "A-1", "phase": "phase2", "attempt": 1, "epoch": 1, "val_loss": 5.0},
            {"unit": "A-1", "phase": "phase2", "attempt": 2, "epoch": 1, "val_loss": 4.0},
            {"unit": "A-1", "phase": "phase2", "attempt": 2, "epoch": 2, "val_loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"unit": "A-1", "pha')
    curves = read_curves(path)
    assert [(r["epoch"], r["val_loss"]) for r in curves["A-1"]["phase2"]] == [(1, 4.0), (2, 3.0)]


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


def test_cli_writes_to_out_and_lists_the_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path / "run", [7])
    result = cli("plot", str(run), "--out", str(tmp_path / "png"))
    assert result.returncode == 0, result.stderr
    assert "7 PNG files in" in result.stdout and "unit-A-100.png" in result.stdout
    assert (tmp_path / "png" / "scaling.png").read_bytes()[:8] == PNG

