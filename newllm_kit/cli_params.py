"""The tables `newllm-kit params` prints: one column per model, every count with all its digits."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def _param_lines(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(line name, key, is a trainable group) for every part and group any of the models has, in order."""
    parts = dict.fromkeys(k for row in rows for k in row if k not in ("label", "trainable", "total"))
    groups = dict.fromkeys(k for row in rows for k in row["trainable"])
    return ([(k, k, False) for k in parts] + [("total", "total", False)]
            + [(f"group {group}", group, True) for group in groups])


def params_tables(title: str, rows: list[dict[str, Any]], width: int) -> list[Table]:
    """One column per model, so every count keeps all its digits at 80 columns; models that do not
    fit beside each other go into further tables. A part or group a model lacks shows as —."""
    lines = _param_lines(rows)
    groups: list[list[tuple[str, list[str]]]] = []
    used = width
    for row in rows:
        cells = [(f"{value:,}" if isinstance(value := (row["trainable"] if group else row).get(key), int) else "—")
                 for _, key, group in lines]
        need = max(len(row["label"]), *map(len, cells)) + 3  # padding and border
        if used + need > width:
            groups.append([])
            used = max(len(name) for name, _, _ in lines) + 4
        groups[-1].append((row["label"], cells))
        used += need
    tables = []
    for group in groups:
        table = Table(title=title)
        table.add_column("")
        for label, _ in group:
            table.add_column(escape(label), justify="right")
        for i, (name, _, _) in enumerate(lines):
            table.add_row(name, *(cells[i] for _, cells in group))
        tables.append(table)
    return tables
