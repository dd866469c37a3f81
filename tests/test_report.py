"""The end-of-run table keeps every number whole on an 80-column terminal."""

from __future__ import annotations

from rich.console import Console

from newllm_kit.report import print_results


def test_results_table_fits_80_columns_without_cutting_numbers() -> None:
    record = {"model": "A", "samples": 12_000, "train_tokens": 1_529_433, "val_ppl": 1234.5678, "val_acc": 0.1234,
              "train_er": 0.5, "val_er": float("nan"), "phase1_iterations": 100, "best_epoch": 10}
    console = Console(record=True, width=80, color_system=None)
    print_results(console, {"experiment": "v2", "run_dir": "runs/v2/x", "results": [record]})
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for needle in ("12,000", "1,529,433", "1234.57", "12.3%", "50.0%", "—", "100", "Samples"):
        assert needle in text, needle
    assert "…" not in text


def test_labels_paths_and_warnings_print_as_text_not_markup() -> None:
    records = [{"model": m, "samples": 10, "train_tokens": 1000, "val_ppl": 12.5, "val_acc": 0.5, "train_er": 0.5,
                "val_er": 0.5, "phase1_iterations": 3, "best_epoch": 2} for m in ("[/x]", "[bold red]X")]
    fits = [{"model": m, "A": 100.0, "alpha": -0.3, "r2": 1.0, "doubling_reduction": 0.19, "alpha_ci": None}
            for m in ("[/x]", "[bold red]X")]
    console = Console(record=True, width=120, color_system=None)
    print_results(console, {"experiment": "v2", "run_dir": "runs/[red]v2/x", "results": records,
                            "scaling": {"fits": fits, "warnings": ["model [/x]: 2 points"]}})
    text = console.export_text()
    for needle in ("runs/[red]v2/x", "[/x] ", "[bold red]X ", "[/x]: PPL =", "[bold red]X: PPL =",
                   "note: model [/x]: 2 points"):
        assert needle in text, needle
