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

from .scaling import doubling_text, series
from .stats import Interval, t_interval

# The metrics the replicate table summarises: record key, header, and how a value reads.
MEAN_COLUMNS = (("val_ppl", "Val PPL", 1.0), ("val_acc", "Val Acc %", 100.0), ("train_er", "Train ER %", 100.0),
                ("val_er", "Val ER %", 100.0))


def _pct(value: Any) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}%"


def _out_of_budget(record: dict[str, Any]) -> bool:
    """Phase 1 ran out of iterations before its convergence target: the contexts are not at a fixed
    point, which a bare iteration count hides."""
    return record.get("phase1_stopped_by") == "max_iterations"


def replicate_groups(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Records by (model or model@variant, samples), in the order they come: the seeds of one unit."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((series(r), r["samples"]), []).append(r)
    return groups


def _mean_cell(interval: Interval, scale: float) -> str:
    half = interval.half_width
    mean = f"{scale * interval.mean:.1f}"
    return mean if half is None else f"{mean} ± {scale * half:.1f}"


def _print_means(console: Console, result: dict[str, Any]) -> None:
    """One row per model × size: mean ± the 95 % t-interval's half-width over the seeds, and n."""
    groups = replicate_groups(result["results"])
    table = Table(title=escape(f"{result['experiment']} — {result['run_dir']}"), box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True,
                  caption="mean ± 95% t-interval half-width over n seeds; each seed's values are in results.csv")
    rows = []
    for (name, samples), group in groups.items():
        cells = []
        for key, _, scale in MEAN_COLUMNS:
            values = [float(r[key]) for r in group if r.get(key) is not None and r[key] == r[key]]
            cells.append(_mean_cell(t_interval(values), scale) if values else "—")
        rows.append((name, f"{samples:,}", f"{group[0]['train_tokens']:,}", str(len(group)), *cells))
    for i, header in enumerate(("Model", "Samples", "Tokens", "n", *(c[1] for c in MEAN_COLUMNS))):
        widest = max([len(row[i]) for row in rows] + [len(word) for word in header.split()])
        table.add_column(header, justify="left" if i == 0 else "right", min_width=widest)
    for row in rows:
        table.add_row(escape(row[0]), *row[1:])
    console.print(table)


def _unit_name(record: dict[str, Any], seeded: bool) -> str:
    return f"{series(record)}-{record['samples']}" + (f"-s{record['seed']}" if seeded else "")


def print_results(console: Console, result: dict[str, Any]) -> None:
    records = result["results"]
    if any(len(group) > 1 for group in replicate_groups(records).values()):
        _print_means(console, result)
        _print_notes(console, result)
        return
    headers = ("Model", "Samples", "Tokens", "Val PPL", "Val Acc", "Train ER", "Val ER", "Phase-1 it.", "Best epoch")
    rows = [(series(r), f"{r['samples']:,}", f"{r['train_tokens']:,}", f"{r['val_ppl']:.2f}", _pct(r["val_acc"]),
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
    _print_notes(console, result)


def _print_notes(console: Console, result: dict[str, Any]) -> None:
    """Footnotes under the results table, the scaling fits and their notes, and where the plots are."""
    records = result["results"]
    if stopped := [r for r in records if _out_of_budget(r)]:
        seeded = len({r.get("seed") for r in records}) > 1
        units = ", ".join(f"{_unit_name(r, seeded)} had {_pct(r['convergence_rate'])}" for r in stopped)
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
        basis = (f"; {fit['sizes']} sizes × {fit['seeds']} seeds" if fit.get("seeds", 1) > 1 else "")
        console.print(f"[bold]{escape(fit['model'])}[/]: PPL = {fit['A']:,.1f} · tokens^({fit['alpha']:.4f})"
                      f"{interval}; R² = {fit['r2']:.4f}; 2× data → {doubling_text(fit['doubling_reduction'])}"
                      f"{escape(basis)}")
    for warning in result.get("scaling", {}).get("warnings", []):
        console.print(f"[yellow]note:[/] {escape(warning)}")
    if plots := result.get("plots"):
        console.print(escape(f"plots: {plots}"))
