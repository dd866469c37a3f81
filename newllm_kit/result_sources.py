"""Results records as `compare` and `plot` read them: from run directories, results.jsonl or
results.csv files, each record checked for the fields they do arithmetic on, and the data
fingerprints checked as `scaling` checks them (PPLs on different data are not comparable)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .errors import DataError
from .scaling import Point, check_comparable, series
from .scaling.points import _has_results, _read, _why_empty, positive_number, run_results_text


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
        text = run_results_text(source) if source.is_dir() else _read(path)
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
