"""The end-of-run table in the seed's shape, and the per-model scaling fits.

Model labels, paths and warnings are the user's text, so they are escaped before rich sees them:
a label `[/x]` prints as itself instead of failing as a markup tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .flops import flops_text, train_flops
from .scaling import doubling_text, series
from .stats import Interval, t_interval

# Built-in metrics' table headers; any other metric shows its name, unit and direction.
HEADERS = {"ppl": "Val PPL", "accuracy": "Val Acc", "effective_rank": "Val ER", "convergence_rate": "Conv. rate"}
ARROWS = {"min": "↓", "max": "↑"}
GAP = 2  # characters between two columns of the results table
# Metric record keys: the built-ins keep the names results files had before metrics were plugins.
METRIC_KEYS = {"ppl": "val_ppl", "accuracy": "val_acc", "effective_rank": "val_er",
               "convergence_rate": "convergence_rate"}
# What a result without its metrics' description (an older caller) shows: the two every record has.
DEFAULT_METRICS = [{"name": "ppl", "key": "val_ppl", "unit": "perplexity", "direction": "min"},
                   {"name": "accuracy", "key": "val_acc", "unit": "fraction", "direction": "max"}]
# Every row's training FLOPs (`newllm_kit.flops`) beside its tokens, whatever its recipe declares: compute
# next to data. Recipes declare the same key as a column for results.csv; the table shows it once.
FLOPS_KEY, FLOPS_HEADER = "train_flops", "FLOPs"


def metric_key(name: str) -> str:
    """The record key and results.csv column of a metric: `val_<name>`, or a built-in's historic name."""
    return METRIC_KEYS.get(name, f"val_{name}")


@dataclass(frozen=True)
class Shown:
    """One numeric column of the results table: a record key, its label, direction arrow, and how a
    value reads."""

    key: str
    label: str
    percent: bool = False
    mean: bool = True  # averaged over seeds in the replicate table
    arrow: str = ""

    @property
    def header(self) -> str:
        return f"{self.label} {self.arrow}".strip()

    @property
    def mean_header(self) -> str:
        """The replicate table shows percentages as numbers: the unit goes into the header."""
        return f"{self.label}{' %' if self.percent else ''} {self.arrow}".strip()


def metric_columns(metrics: list[dict[str, Any]]) -> list[Shown]:
    """A column per configured metric (`{"name", "key", "unit", "direction"}`), with its direction's arrow
    and, for a metric that is not built in, its unit; fractions show as %."""
    shown = []
    for m in metrics:
        arrow = ARROWS.get(str(m.get("direction")), "")
        unit = str(m.get("unit") or "")
        percent = unit.startswith("fraction")
        label = HEADERS.get(m["name"]) or (f"{m['name']} ({unit})" if unit and not percent else m["name"])
        shown.append(Shown(m["key"], label, percent, True, arrow))
    return shown


def recipe_columns(records: list[dict[str, Any]]) -> list[Shown]:
    """The columns the records' recipes declare, in order of first appearance."""
    found: dict[str, Shown] = {}
    for r in records:
        for key, header, percent, mean in r.get("columns", []):
            if key != FLOPS_KEY:  # the table's own FLOPs column
                found.setdefault(key, Shown(key, header, bool(percent), bool(mean)))
    return list(found.values())


def _cell(value: Any, column: Shown) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if column.percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


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


def _table(result: dict[str, Any], headers: list[str], rows: list[tuple[str, ...]], width: int,
           caption: str | None = None) -> list[Table]:
    """Numbers are never cut and no column is dropped. Headers stay on one line where the whole table fits
    `width`; otherwise every column narrows to its widest cell or header word and headers wrap at spaces
    (the seed-shaped table then fits 80 columns); where even that is too wide (a file or pipe is 80
    columns, and sweeps have long model names), the columns go into further tables, each repeating the
    Model column, so every value is printed at any width."""
    title = escape(f"{result['experiment']} — {result['run_dir']}")
    natural = [max([len(row[i]) for row in rows] + [len(header)]) for i, header in enumerate(headers)]
    narrow = [max([len(row[i]) for row in rows] + [len(word) for word in header.split()])
              for i, header in enumerate(headers)]
    if sum(natural) + GAP * (len(headers) - 1) <= width:
        return [_part(title, headers, rows, range(len(headers)), narrow, None, caption)]
    parts: list[list[int]] = [[0]]
    for i in range(1, len(headers)):
        if sum(narrow[j] for j in parts[-1]) + GAP * len(parts[-1]) + narrow[i] > width and len(parts[-1]) > 1:
            parts.append([0])
        parts[-1].append(i)
    return [_part(title if n == 0 else f"{title} (continued)", headers, rows, columns, narrow, narrow,
                  caption if n == len(parts) - 1 else None) for n, columns in enumerate(parts)]


def _part(title: str, headers: list[str], rows: list[tuple[str, ...]], columns: Any, least: list[int],
          most: list[int] | None, caption: str | None) -> Table:
    """The results table over `columns` (indices; 0 is the Model column), each at least `least` wide."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  caption=caption)
    for i in columns:
        table.add_column(headers[i], justify="left" if i == 0 else "right", min_width=least[i],
                         max_width=None if most is None else most[i])
    for row in rows:
        table.add_row(*(escape(row[i]) if i == 0 else row[i] for i in columns))
    return table


def _print_means(console: Console, result: dict[str, Any], columns: list[Shown]) -> None:
    """One row per model × size: mean ± the 95 % t-interval's half-width over the seeds, and n."""
    averaged = [c for c in columns if c.mean]
    rows = []
    for (name, samples), group in replicate_groups(result["results"]).items():
        cells = []
        for column in averaged:
            values = [float(r[column.key]) for r in group
                      if isinstance(r.get(column.key), int | float) and r[column.key] == r[column.key]]
            cells.append(_mean_cell(t_interval(values), 100.0 if column.percent else 1.0) if values else "—")
        counted = [f for f in map(train_flops, group) if f is not None]
        mean_flops = sum(counted) / len(counted) if len(counted) == len(group) else None
        rows.append((name, f"{samples:,}", f"{group[0]['train_tokens']:,}", flops_text(mean_flops), str(len(group)),
                     *cells))
    headers = ["Model", "Samples", "Tokens", FLOPS_HEADER, "n", *(c.mean_header for c in averaged)]
    for table in _table(result, headers, rows, console.width,
                        "mean ± 95% t-interval half-width over n seeds; each seed's values are in results.csv"):
        console.print(table)


def _unit_name(record: dict[str, Any], seeded: bool) -> str:
    return f"{series(record)}-{record['samples']}" + (f"-s{record['seed']}" if seeded else "")


def print_results(console: Console, result: dict[str, Any]) -> None:
    """The results table: each unit's size (documents, tokens) and training FLOPs (— where its record has
    none), the configured metrics, then the recipes' columns; a flagged cell has a * and a footnote. With
    several seeds per unit, their means and intervals instead (FLOPs: the mean over the seeds)."""
    records = result["results"]
    columns = metric_columns(result.get("metrics") or DEFAULT_METRICS) + recipe_columns(records)
    if any(len(group) > 1 for group in replicate_groups(records).values()):
        _print_means(console, result, columns)
        _print_notes(console, result)
        return
    rows = [(series(r), f"{r['samples']:,}", f"{r['train_tokens']:,}", flops_text(train_flops(r)),
             *(_cell(r.get(c.key), c) + ("*" if c.key in r.get("flags", {}) else "") for c in columns))
            for r in records]
    headers = ["Model", "Samples", "Tokens", FLOPS_HEADER, *(c.header for c in columns)]
    for table in _table(result, headers, rows, console.width):
        console.print(table)
    _print_notes(console, result)


def selection_footer(records: list[dict[str, Any]]) -> str:
    """Which rows chose each unit's epoch, under every results table: the validation rows themselves
    (the seed's protocol: its PPLs are slightly optimistic) or a development split."""
    ways = {r.get("early_stopping", "val") for r in records}
    if ways == {"dev"}:
        return ("epochs selected on the development rows ([data] dev); the validation rows were scored once, "
                "at the end")
    if ways == {"val"}:
        return ("epochs selected on the validation rows themselves (the seed's protocol: these PPLs are slightly "
                "optimistic; set [data] dev for a development split)")
    return "epochs selected on the development rows in some units and on the validation rows in others"


def _print_notes(console: Console, result: dict[str, Any]) -> None:
    """Footnotes under the results table, the scaling fits and their notes, and where the plots are."""
    records = result["results"]
    seeded = len({r.get("seed") for r in records}) > 1
    for r in records:
        for why in r.get("flags", {}).values():
            console.print(escape(f"* {_unit_name(r, seeded)}: {why}"))
    console.print(escape(selection_footer(records)))
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
