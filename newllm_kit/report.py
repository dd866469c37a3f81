"""The end-of-run table in the seed's shape, and the per-model scaling fits."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(value: Any) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}%"


def print_results(console: Console, result: dict[str, Any]) -> None:
    records = result["results"]
    table = Table(title=f"{result['experiment']} — {result['run_dir']}")
    for column in ("Model", "Samples", "Tokens", "Val PPL", "Val Acc", "Train ER", "Val ER", "Phase-1 it.",
                   "Best epoch"):
        table.add_column(column, justify="left" if column == "Model" else "right")
    for r in records:
        table.add_row(r["model"], f"{r['samples']:,}", f"{r['train_tokens']:,}", f"{r['val_ppl']:.2f}",
                      _pct(r["val_acc"]), _pct(r["train_er"]), _pct(r["val_er"]), str(r["phase1_iterations"]),
                      str(r["best_epoch"]))
    console.print(table)
    bounds = {r["model"]: r["best_possible_ppl"] for r in records if "best_possible_ppl" in r}
    if bounds:
        best = next(iter(bounds.values()))
        console.print(f"best achievable validation PPL for this synthetic source: {best:.2f}")
    fits = result.get("scaling", {}).get("fits", [])
    for fit in fits:
        ci = fit.get("alpha_ci")
        interval = f" (95% CI {ci[0]:.4f} … {ci[1]:.4f})" if ci else ""
        console.print(f"[bold]{fit['model']}[/]: PPL = {fit['A']:,.1f} · tokens^({fit['alpha']:.4f}){interval}; "
                      f"R² = {fit['r2']:.4f}; 2× data → {100 * fit['doubling_reduction']:.1f}% lower PPL")
    for warning in result.get("scaling", {}).get("warnings", []):
        console.print(f"[yellow]note:[/] {warning}")
