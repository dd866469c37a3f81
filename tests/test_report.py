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


def test_a_phase_1_stopped_by_its_budget_is_marked_with_its_convergence() -> None:
    base = {"samples": 300, "train_tokens": 26_983, "val_ppl": 274.0, "val_acc": 0.1, "train_er": 0.5,
            "val_er": 0.5, "best_epoch": 6, "phase1_target_rate": 0.95}
    records = [{**base, "model": "A", "phase1_iterations": 12, "convergence_rate": 0.112,
                "phase1_stopped_by": "max_iterations"},
               {**base, "model": "B", "phase1_iterations": 23, "convergence_rate": 0.96,
                "phase1_stopped_by": "converged"},
               {**base, "model": "C", "phase1_iterations": 7, "convergence_rate": 0.5}]  # written before the field
    console = Console(record=True, width=80, color_system=None)
    print_results(console, {"experiment": "quickstart", "run_dir": "runs/q/x", "results": records})
    lines = console.export_text().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("A ", "B ", "C ")}
    assert rows["A"][-2] == "12*" and rows["B"][-2] == "23" and rows["C"][-2] == "7"
    assert ("* Phase 1 stopped at max_iterations before reaching its target of 95.0% converged tokens: "
            "A-300 had 11.2%") in " ".join(line.strip() for line in lines)


def test_a_fit_where_more_data_raises_ppl_says_higher() -> None:
    fits = [{"model": "A", "A": 10.0, "alpha": 0.25, "r2": 1.0, "doubling_reduction": 1 - 2**0.25, "alpha_ci": None},
            {"model": "B", "A": 100.0, "alpha": -0.3, "r2": 1.0, "doubling_reduction": 1 - 2**-0.3, "alpha_ci": None}]
    console = Console(record=True, width=200, color_system=None)
    print_results(console, {"experiment": "q", "run_dir": "r", "results": [], "scaling": {"fits": fits}})
    text = console.export_text()
    assert "2× data → 18.9% higher PPL" in text and "2× data → 18.8% lower PPL" in text
    assert "→ -" not in text
