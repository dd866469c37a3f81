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
