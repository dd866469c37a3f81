"""`newllm-kit compare`: is one model (or sweep variant) better than another, beyond seed noise?

For every pair at every training size: the difference of the means with a 95 % interval (paired
by seed when both sides ran the same seeds, Welch otherwise) and a verdict in words; for the
scaling fits, the difference in α with its interval. Sources whose data fingerprints differ are
refused unless allowed, exactly as `scaling` refuses them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DataError, UserError
from .scaling import Fit, Point, check_comparable, fit_all, series
from .scaling.points import _has_results, _read, _why_empty, positive_number
from .stats import Difference, estimate_difference, paired, t_quantile, welch

# Metrics that are shares (0…1): differences read in percentage points, not relative to a mean.
SHARES = ("val_acc", "train_er", "val_er", "convergence_rate")


@dataclass(frozen=True)
class Comparison:
    context: str  # what both sides share: the size (and variant or model)
    a: str
    b: str
    mean_a: float
    mean_b: float
    difference: Difference
    verdict: str


def load_records(sources: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Results records from run directories, results.jsonl or results.csv files; a unit listed twice
    (same model, variant, size and seed) is counted once, with a warning."""
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    seen: set[tuple[str, int, Any]] = set()
    for source in sources:
        if source.is_dir() and not _has_results(source):
            raise DataError(f"{source}: {_why_empty(source)}")
        path = source / "results.jsonl" if source.is_dir() else source
        text = _read(path)
        rows = _jsonl(path, text) if path.suffix != ".csv" and text.lstrip()[:1] == "{" else _csv(path, text)
        if not rows:
            raise DataError(f"{path}: empty (no data rows)")
        for row in rows:
            row["source"] = str(path)
            key = (series(row), int(row["samples"]), row.get("seed"))
            if key in seen:
                warnings.append(f"{path}: {key[0]} at {key[1]:,} samples, seed {key[2]}, is listed again; "
                                f"counted once")
                continue
            seen.add(key)
            records.append(row)
    return records, warnings


def _jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not valid JSON") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: not a results record (JSON nested too deeply)") from None
        if not isinstance(row, dict) or not {"model", "samples", "train_tokens"} <= row.keys():
            raise DataError(f"{path}:{number}: expected a results record with model, samples and train_tokens")
        rows.append(_checked(row, f"{path}:{number}"))
    return rows


def _checked(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields a comparison does arithmetic on or sorts by have the types it needs: a one-line
    DataError naming the record otherwise."""
    samples, seed = row.get("samples"), row.get("seed")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise DataError(f"{where}: samples must be a positive whole number (got {str(samples)[:40]!r})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DataError(f"{where}: seed must be a whole number (got {str(seed)[:40]!r})")
    positive_number(row.get("train_tokens"), "train_tokens", where)
    return row


def _csv(path: Path, text: str) -> list[dict[str, Any]]:
    """A run's results.csv: numbers become numbers, empty cells are dropped."""
    reader = csv.DictReader(text.splitlines(), strict=True)  # an unclosed quote is an error, not a swallowed table
    try:
        return _csv_rows(path, reader)
    except csv.Error as error:  # a field over the csv module's limit, a NUL byte, broken quoting
        raise DataError(f"{path}: line {reader.line_num + 1}: not a CSV table ({error}); give a run's "
                        f"results.csv") from None


def _csv_rows(path: Path, reader: csv.DictReader[str]) -> list[dict[str, Any]]:
    missing = {"model", "samples", "train_tokens"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; give a run's results.csv")
    rows = []
    for raw in reader:
        row: dict[str, Any] = {}
        for key, value in raw.items():
            if key is None or value in (None, ""):
                continue
            try:
                row[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                row[key] = value
        rows.append(_checked(row, f"{path}: row {reader.line_num}"))
    return rows


def check_sources(records: list[dict[str, Any]], allow_mixed: bool) -> list[str]:
    """The fingerprint check of `scaling`: PPLs on different data are not comparable."""
    points = [Point(series(r), float(r["train_tokens"]), 1.0,
                    json.dumps(r["fingerprints"], sort_keys=True) if r.get("fingerprints") else None, r["source"])
              for r in records]
    return check_comparable(points, allow_mixed)


def _sides(record: dict[str, Any], by: str) -> tuple[str, str]:
    """(the context both sides of a comparison share, the side this record is on)."""
    variant = record.get("variant") or ""
    size = f"{record['samples']:,} docs"
    if by == "model":
        return (f"{size} @{variant}" if variant else size), str(record["model"])
    return f"{record['model']}, {size}", variant


def _numeric(value: Any) -> bool:
    """A number a metric can be compared by: not text, and not a true/false flag (an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare_records(records: list[dict[str, Any]], metric: str, by: str) -> list[Comparison]:
    """Every pair of sides within every context, in the order the records list them."""
    if not any(_numeric(r.get(metric)) for r in records):  # absent, or text and flags such as `model`
        known = sorted(k for k, v in records[0].items() if _numeric(v))
        what = "not a number in the results" if any(metric in r for r in records) else "not in the results"
        raise UserError(f"--metric {metric}: {what}; choose one of {', '.join(known)}")
    if by == "variant" and not any(r.get("variant") for r in records):
        raise UserError("--by variant: these results have no sweep variants; use --by model")
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        context, side = _sides(r, by)
        if _numeric(r.get(metric)) and math.isfinite(r[metric]):
            groups.setdefault(context, {}).setdefault(side, []).append(r)
    out = []
    for context, sides in groups.items():
        for a, b in combinations(sides, 2):
            out.append(_compare(context, a, b, sides[a], sides[b], metric))
    if not out:
        raise UserError(_nothing_to_compare(records, metric, by))
    return out


def _nothing_to_compare(records: list[dict[str, Any]], metric: str, by: str) -> str:
    """Why no two sides met at any training size: one side only, or only one side has the metric."""
    sides = list(dict.fromkeys(_sides(r, by)[1] for r in records))
    what = "models" if by == "model" else "sweep variants"
    if len(sides) < 2:
        hint = ("; --by variant compares its sweep variants"
                if by == "model" and any(r.get("variant") for r in records) else "")
        return f"--by {by}: these results have one {what[:-1]} ({sides[0]}), nothing to compare it with{hint}"
    having = list(dict.fromkeys(_sides(r, by)[1] for r in records
                                if _numeric(r.get(metric)) and math.isfinite(r[metric])))
    if len(having) < 2:
        lacking = ", ".join(s for s in sides if s not in having)
        return (f"--metric {metric}: only {', '.join(having) or 'no side'} recorded it, not {lacking}; "
                f"choose a metric both sides recorded")
    return f"--by {by}: no two {what} share a training size, nothing to compare"


def _compare(context: str, a: str, b: str, left: list[dict[str, Any]], right: list[dict[str, Any]],
             metric: str) -> Comparison:
    seeds_a = {r.get("seed"): r[metric] for r in left}
    seeds_b = {r.get("seed"): r[metric] for r in right}
    same_seeds = len(seeds_a) == len(left) and seeds_a.keys() == seeds_b.keys() and None not in seeds_a
    if same_seeds and len(seeds_a) > 1:
        order = sorted(s for s in seeds_a if s is not None)
        diff = paired([seeds_a[s] for s in order], [seeds_b[s] for s in order])
    else:
        diff = welch([r[metric] for r in left], [r[metric] for r in right])
    if diff.low is None:  # a side with one value has no spread: no test was possible
        diff = replace(diff, method="none")
    mean_a = sum(r[metric] for r in left) / len(left)
    mean_b = sum(r[metric] for r in right) / len(right)
    return Comparison(context, a, b, mean_a, mean_b, diff, verdict(a, b, mean_b, diff, metric))


def verdict(a: str, b: str, mean_b: float, diff: Difference, metric: str) -> str:
    """"A lower by 1.4% ± 0.9%: distinguishable" or "…: within noise"; shares in percentage points."""
    share = metric in SHARES
    scale, unit = (100.0, " points") if share else (100.0 / abs(mean_b) if mean_b else math.nan, "%")
    direction = "lower" if diff.estimate < 0 else "higher"
    text = f"{a} {direction} than {b} by {scale * abs(diff.estimate):.2f}{unit}"
    if diff.low is None or diff.high is None:
        return f"{text}: no interval (one seed on a side; add experiment.seeds)"
    half = scale * (diff.high - diff.low) / 2
    return f"{text} ± {half:.2f}{unit}: {'distinguishable' if diff.excludes_zero else 'within noise'}"


def compare_alphas(fits: list[Fit], records: list[dict[str, Any]], by: str) -> list[Comparison]:
    """α of every pair of fits that share a context (the variant for --by model, the model for
    --by variant) and both have an interval; each fit's standard error comes back from its interval."""
    contexts: dict[str, dict[str, Fit]] = {}
    names = {series(r): r for r in records}
    for f in fits:
        if f.alpha_ci is None or f.model not in names:
            continue
        r = names[f.model]
        context, side = ((r.get("variant") or "", str(r["model"])) if by == "model"
                         else (str(r["model"]), r.get("variant") or ""))
        contexts.setdefault(context, {})[side] = f
    out = []
    for context, sides in contexts.items():
        for a, b in combinations(sides, 2):
            fa, fb = sides[a], sides[b]
            diff = replace(estimate_difference(fa.alpha, _alpha_se(fa), fa.points - 2, fb.alpha, _alpha_se(fb),
                                               fb.points - 2), n_a=fa.points, n_b=fb.points)
            assert diff.low is not None and diff.high is not None
            word = "distinguishable" if diff.excludes_zero else "within noise"
            text = (f"α({a}) − α({b}) = {diff.estimate:+.4f} (95% CI {diff.low:+.4f} … {diff.high:+.4f}): "
                    f"{a if diff.estimate < 0 else b} scales more steeply, {word}")
            out.append(Comparison(f"α (fit){' @' + context if context else ''}", a, b, fa.alpha, fb.alpha, diff,
                                  text))
    return out


def _alpha_se(fit: Fit) -> float:
    assert fit.alpha_ci is not None
    return (fit.alpha_ci[1] - fit.alpha_ci[0]) / 2 / t_quantile(fit.points - 2)


def compare(sources: list[Path], metric: str, by: str, allow_mixed: bool) -> dict[str, Any]:
    """The whole comparison as the `--json` document."""
    if by not in ("model", "variant"):
        raise UserError(f"--by: expected model or variant (got {by!r})")
    records, warnings = load_records(sources)
    warnings += check_sources(records, allow_mixed)
    pairs = compare_records(records, metric, by)
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]), None, r["source"], r.get("seed"))
              for r in records if isinstance(r.get("val_ppl"), int | float) and math.isfinite(r["val_ppl"])]
    fittable = [p for p in points if len({q.tokens for q in points if q.model == p.model}) >= 2]
    # α belongs to the PPL scaling law: shown beside PPL comparisons only
    alphas = compare_alphas(fit_all(fittable, []).fits, records, by) if fittable and metric == "val_ppl" else []
    return {"sources": sorted({r["source"] for r in records}), "metric": metric, "by": by,
            "comparisons": [_to_json(c) for c in pairs], "alpha": [_to_json(c) for c in alphas],
            "warnings": warnings}


def _to_json(c: Comparison) -> dict[str, Any]:
    d = c.difference
    return {"context": c.context, "a": c.a, "b": c.b, "mean_a": c.mean_a, "mean_b": c.mean_b,
            "difference": d.estimate, "ci": None if d.low is None else [d.low, d.high], "method": d.method,
            "n_a": d.n_a, "n_b": d.n_b, "verdict": c.verdict}


def render(document: dict[str, Any], console: Console) -> None:
    console.print(escape(f"sources: {', '.join(document['sources'])}"))
    # Headers name the sides by position, never by letters a model could be called; names fold onto
    # further lines instead of being cut, so two rows never look alike.
    table = Table(title=f"{document['metric']}: first − second, 95% interval",
                  caption="n: seeds (points for a fit); paired: by seed, where both sides ran the same seeds; "
                          "welch: unequal variances; no test: a side has one seed, so no test was possible")
    for column in ("Where", "First", "Second", "n", "Mean, first", "Mean, second", "First − second (95% CI)",
                   "Test"):
        text = column in ("Where", "First", "Second", "Test")
        table.add_column(column, justify="left" if text else "right", overflow="fold")
    rows = document["comparisons"] + document["alpha"]
    for c in rows:
        ci = f"[{c['ci'][0]:.4g}, {c['ci'][1]:.4g}]" if c["ci"] else "—"
        table.add_row(escape(c["context"]), escape(c["a"]), escape(c["b"]), f"{c['n_a']}/{c['n_b']}",
                      f"{c['mean_a']:.4g}", f"{c['mean_b']:.4g}", f"{c['difference']:+.4g} {ci}",
                      c["method"] if c["ci"] else "no test")
    console.print(table)
    for c in rows:
        console.print(f"{escape(c['context'])}: {escape(c['verdict'])}")
    for warning in document["warnings"]:
        console.print(f"[yellow]warning: {escape(warning)}[/]")
