"""The end-of-run table in the seed's shape, and the per-model scaling fits.

Model labels, paths and warnings are the user's text, so they are escaped before rich sees them:
a label `[/x]` prints as itself instead of failing as a markup tag.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .scaling import doubling_text


def _pct(value: Any) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}%"


def _out_of_budget(record: dict[str, Any]) -> bool:
    """Phase 1 ran out of iterations before its convergence target: the contexts are not at a fixed
    point, which a bare iteration count hides."""
    return record.get("phase1_stopped_by") == "max_iterations"


def print_results(console: Console, result: dict[str, Any]) -> None:
    records = result["results"]
    headers = ("Model", "Samples", "Tokens", "Val PPL", "Val Acc", "Train ER", "Val ER", "Phase-1 it.", "Best epoch")
    rows = [(r["model"], f"{r['samples']:,}", f"{r['train_tokens']:,}", f"{r['val_ppl']:.2f}", _pct(r["val_acc"]),
             _pct(r["train_er"]), _pct(r["val_er"]), f"{r['phase1_iterations']}{'*' if _out_of_budget(r) else ''}",
             str(r["best_epoch"]))
            for r in records]
    table = Table(title=escape(f"{result['experiment']} — {result['run_dir']}"), box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    for i, header in enumerate(headers):
        # Numbers are never cut: each column keeps at least its widest cell and header word, and
        # headers wrap at spaces instead (the seed-shaped table then fits 80 columns).
        widest = max([len(row[i]) for row in rows] + [len(word) for word in header.split()])
        table.add_column(header, justify="left" if i == 0 else "right", min_width=widest)
    for row in rows:
        table.add_row(escape(row[0]), *row[1:])
    console.print(table)
    if stopped := [r for r in records if _out_of_budget(r)]:
        units = ", ".join(f"{r['model']}-{r['samples']} had {_pct(r['convergence_rate'])}" for r in stopped)
        target = " / ".join(sorted({_pct(r.get("phase1_target_rate")) for r in stopped}))
        console.print(escape(f"* Phase 1 stopped at max_iterations before reaching its target of {target} converged "
                             f"tokens: {units}"))
    bounds = {r["model"]: r["best_possible_ppl"] for r in records if "best_possible_ppl" in r}
    if bounds:
        best = next(iter(bounds.values()))
        console.print(f"best achievable validation PPL for this synthetic source: {best:.2f}")
    fits = result.get("scaling", {}).get("fits", [])
    for fit in fits:
        ci = fit.get("alpha_ci")
        interval = f" (95% CI {ci[0]:.4f} … {ci[1]:.4f})" if ci else ""
        console.print(f"[bold]{escape(fit['model'])}[/]: PPL = {fit['A']:,.1f} · tokens^({fit['alpha']:.4f})"
                      f"{interval}; R² = {fit['r2']:.4f}; 2× data → {doubling_text(fit['doubling_reduction'])}")
    for warning in result.get("scaling", {}).get("warnings", []):
        console.print(f"[yellow]note:[/] {escape(warning)}")
