"""The end-of-run table keeps every number whole on an 80-column terminal and says every row's training FLOPs."""

from __future__ import annotations

from rich.console import Console

from newllm_kit.report import print_results

METRICS = [{"name": "ppl", "key": "val_ppl", "unit": "perplexity", "direction": "min"},
           {"name": "accuracy", "key": "val_acc", "unit": "fraction", "direction": "max"},
           {"name": "effective_rank", "key": "val_er", "unit": "fraction of width", "direction": "max"},
           {"name": "convergence_rate", "key": "convergence_rate", "unit": "fraction of tokens", "direction": "max"}]
CVFP_COLUMNS = [["train_er", "Train ER", True, True], ["phase1_iterations", "Phase-1 it.", False, False],
                ["best_epoch", "Best epoch", False, False]]


def test_results_table_fits_80_columns_without_cutting_numbers() -> None:
    record = {"model": "A", "samples": 12_000, "train_tokens": 1_529_433, "val_ppl": 1234.5678, "val_acc": 0.1234,
              "train_er": 0.5, "val_er": float("nan"), "convergence_rate": 0.961, "phase1_iterations": 100,
              "best_epoch": 10, "columns": CVFP_COLUMNS}
    console = Console(record=True, width=80, color_system=None)
    print_results(console, {"experiment": "v2", "run_dir": "runs/v2/x", "results": [record], "metrics": METRICS})
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for needle in ("12,000", "1,529,433", "1234.57", "12.3%", "50.0%", "96.1%", "—", "100", "Samples", "↓", "↑"):
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


def test_a_flagged_cell_is_starred_with_a_footnote() -> None:
    base = {"samples": 300, "train_tokens": 26_983, "val_ppl": 274.0, "val_acc": 0.1, "train_er": 0.5,
            "val_er": 0.5, "best_epoch": 6, "columns": CVFP_COLUMNS}
    why = "Phase 1 stopped at max_iterations before reaching its target of 95% converged tokens (had 11%)"
    records = [{**base, "model": "A", "phase1_iterations": 12, "flags": {"phase1_iterations": why}},
               {**base, "model": "B", "phase1_iterations": 23, "flags": {}},
               {**base, "model": "C", "phase1_iterations": 7}]  # written before flags existed
    console = Console(record=True, width=80, color_system=None)
    print_results(console, {"experiment": "quickstart", "run_dir": "runs/q/x", "results": records})
    lines = console.export_text().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("A ", "B ", "C ")}
    assert rows["A"][-2] == "12*" and rows["B"][-2] == "23" and rows["C"][-2] == "7"
    assert f"* A-300: {why}" in " ".join(line.strip() for line in lines)


def test_a_custom_metric_shows_its_unit_and_direction_and_other_recipes_columns_are_blank() -> None:
    metrics = [*METRICS[:2], {"name": "bits_per_token", "key": "val_bits_per_token", "unit": "bits",
                              "direction": "min"}]
    records = [{"model": "A", "samples": 10, "train_tokens": 100, "val_ppl": 8.0, "val_acc": 0.5,
                "val_bits_per_token": 3.0, "train_er": 0.4, "best_epoch": 2, "columns": CVFP_COLUMNS[:1]},
               {"model": "T", "samples": 10, "train_tokens": 100, "val_ppl": 4.0, "val_acc": 0.6,
                "val_bits_per_token": 2.0, "best_epoch": 3, "epochs_run": 4,
                "columns": [["best_epoch", "Best epoch", False, False], ["epochs_run", "Epochs", False, False]]}]
    console = Console(record=True, width=120, color_system=None)
    print_results(console, {"experiment": "b", "run_dir": "r", "results": records, "metrics": metrics})
    text = console.export_text()
    assert all(word in text for word in ("bits_per_token", "(bits)", "↓", "Train", "Epochs"))
    row = next(line.split() for line in text.splitlines() if line.startswith("T "))
    assert row[3:] == ["—", "4.00", "60.0%", "2.00", "—", "3", "4"]  # no FLOPs recorded: —


def test_a_fit_where_more_data_raises_ppl_says_higher() -> None:
    fits = [{"model": "A", "A": 10.0, "alpha": 0.25, "r2": 1.0, "doubling_reduction": 1 - 2**0.25, "alpha_ci": None},
            {"model": "B", "A": 100.0, "alpha": -0.3, "r2": 1.0, "doubling_reduction": 1 - 2**-0.3, "alpha_ci": None}]
    console = Console(record=True, width=200, color_system=None)
    print_results(console, {"experiment": "q", "run_dir": "r", "results": [], "scaling": {"fits": fits}})
    text = console.export_text()
    assert "2× data → 18.9% higher PPL" in text and "2× data → 18.8% lower PPL" in text
    assert "→ -" not in text


def test_every_row_says_its_training_flops_beside_its_tokens_and_an_older_record_a_dash() -> None:
    base = {"samples": 10, "train_tokens": 100, "val_ppl": 8.0, "val_acc": 0.5}
    records = [{**base, "model": "A", "flops": {"phase1": 2e12, "phase2": 1.214e12, "eval": 1e11, "total": 3.214e12},
                "train_flops": 3.214e12, "columns": [["train_flops", "FLOPs", False, False]]},
               {**base, "model": "T", "flops": {"train": 9.5e11, "eval": 1e10, "total": 9.5e11}},  # total alone
               {**base, "model": "OLD"}]  # written before FLOPs were counted
    console = Console(record=True, width=120, color_system=None)
    print_results(console, {"experiment": "b", "run_dir": "r", "results": records, "metrics": METRICS[:2]})
    lines = console.export_text().splitlines()
    assert lines[1].split()[:4] == ["Model", "Samples", "Tokens", "FLOPs"] and lines[1].count("FLOPs") == 1
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert (rows["A"][3], rows["T"][3], rows["OLD"][3]) == ("3.21e12", "9.50e11", "—")


def test_the_seed_means_table_shows_the_mean_flops() -> None:
    records = [{"model": "A", "samples": 10, "seed": s, "train_tokens": 100, "val_ppl": 8.0 + s, "val_acc": 0.5,
                "train_flops": f} for s, f in ((1, 3e12), (2, 5e12))]
    console = Console(record=True, width=120, color_system=None)
    print_results(console, {"experiment": "b", "run_dir": "r", "results": records, "metrics": METRICS[:2]})
    row = next(line.split() for line in console.export_text().splitlines() if line.startswith("A "))
    assert row[:5] == ["A", "10", "100", "4.00e12", "2"]


def test_the_footer_says_which_rows_chose_the_epochs() -> None:
    base = {"samples": 300, "train_tokens": 26_983, "val_ppl": 274.0, "val_acc": 0.1, "model": "A"}

    def footer(*ways: str | None) -> str:
        records = [{**base, **({} if way is None else {"early_stopping": way})} for way in ways]
        console = Console(record=True, width=200, color_system=None)
        print_results(console, {"experiment": "e", "run_dir": "runs/e/x", "results": records})
        return " ".join(console.export_text().split())

    assert "epochs selected on the validation rows themselves (the seed's protocol" in footer(None, "val")
    assert "epochs selected on the development rows ([data] dev)" in footer("dev")
    assert "in some units and on the validation rows in others" in footer("dev", None)
