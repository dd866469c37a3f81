"""`newllm-kit select`: a sweep's setting chosen on the development rows, and what it scores on validation.

The rule: for each model and training size, the sweep variant with the lowest mean development NLL
(ln `dev_ppl`) over its seeds; ties go to the first variant by name, and a model whose variants all
score the same (one the swept keys do not reach, such as CVFP under `lm.learning_rate`) is reported
once, as "all equal". The validation numbers of the chosen
variant are then reported (mean PPL over seeds with a 95 % t-interval on NLL, mean training FLOPs):
they were scored once, never looked at by the choice. Without a development split there is nothing
to choose on that the reported number does not also depend on, so the command refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UserError
from .flops import flops_text, train_flops
from .result_sources import check_sources, load_records
from .stats import t_interval

ALL_EQUAL = "all equal"  # every variant of the model scored the same: the sweep does not reach it


@dataclass(frozen=True)
class Choice:
    model: str
    samples: int
    variant: str
    sweep: dict[str, Any]
    seeds: int
    dev_ppl: float  # exp(mean dev NLL) over the seeds
    val_ppl: float  # exp(mean val NLL)
    val_low: float | None  # the 95 % t-interval of the mean val NLL, as PPL (None: one seed)
    val_high: float | None
    flops: float | None  # mean training FLOPs
    others: dict[str, float]  # every variant's dev PPL (the chosen one's included)


def _nll(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{record.get('model')}-{record.get('samples')} (variant {record.get('variant', '')!r}, seed "
                        f"{record.get('seed')}): no {key}; a unit without it cannot be selected or reported")
    return math.log(value)


def select(records: list[dict[str, Any]]) -> list[Choice]:
    """The rule above, per (model, training size), in the order the records first name them."""
    if not any(r.get("variant") for r in records):
        raise UserError("these results have no sweep variants ([sweep]); nothing to choose between")
    if any("dev_ppl" not in r for r in records):
        raise UserError("these results have no development split ([data] dev): choosing a variant on the "
                        "validation rows would make their numbers optimistic; add [data] dev and run again")
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault((r["model"], int(r["samples"])), {}).setdefault(str(r["variant"]), []).append(r)
    choices = []
    for (model, samples), variants in groups.items():
        dev = {name: sum(_nll(r, "dev_ppl") for r in rs) / len(rs) for name, rs in sorted(variants.items())}
        best = min(dev, key=lambda name: dev[name])  # min keeps the first of equal values
        chosen = variants[best]
        if len(set(dev.values())) == 1 and len(dev) > 1:
            best = ALL_EQUAL
        interval = t_interval([_nll(r, "val_ppl") for r in chosen])
        half = interval.half_width
        flops = [train_flops(r) for r in chosen]
        choices.append(Choice(
            model, samples, best, {} if best == ALL_EQUAL else dict(chosen[0].get("sweep", {})), len(chosen),
            math.exp(dev[chosen[0]["variant"]]),
            math.exp(interval.mean), None if half is None else math.exp(interval.mean - half),
            None if half is None else math.exp(interval.mean + half),
            None if None in flops else sum(f or 0.0 for f in flops) / len(flops),
            {name: math.exp(value) for name, value in dev.items()}))
    return choices


def select_sources(sources: list[Path], allow_mixed: bool) -> dict[str, Any]:
    records, sources_read = load_records(sources)
    warnings = check_sources(records, allow_mixed)
    return {"sources": sources_read, "warnings": warnings,
            "rule": "per model and size: the variant with the lowest mean development NLL over seeds",
            "selected": [vars(c) for c in select(records)]}


def render(document: dict[str, Any], console: Console) -> None:
    table = Table(title="selected on the development rows; validation scored once")
    left = ("Model", "Variant", "Dev PPL by variant")
    for column in ("Model", "Samples", "Variant", "Seeds", "Dev PPL", "Val PPL (95% CI)", "FLOPs", left[2]):
        table.add_column(column, justify="left" if column in left else "right")
    for c in document["selected"]:
        interval = "" if c["val_low"] is None else f" ({c['val_low']:.2f}–{c['val_high']:.2f})"
        others = ", ".join(f"{name} {value:.2f}" for name, value in c["others"].items())
        table.add_row(escape(c["model"]), f"{c['samples']:,}", escape(c["variant"]), str(c["seeds"]),
                      f"{c['dev_ppl']:.2f}", f"{c['val_ppl']:.2f}{interval}", flops_text(c["flops"]), escape(others))
    console.print(table)
    console.print(escape(f"rule: {document['rule']}"))
    for line in document["warnings"]:
        console.print(f"[yellow]note:[/] {escape(line)}")
