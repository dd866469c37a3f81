"""Which records of a results.jsonl a resume can keep as finished units.

A run directory may have been edited or received from someone else, so a record is checked for the
fields the kit reads from it (the table, results.csv, summary.json, scaling fits, plots) before it
counts as a finished unit; a record that fails is set aside and its unit runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNITS_DIR = "units"  # units/<id>/record.json: each finished unit's record, the source of results.jsonl
RECORD = "record.json"


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _number_or_null(value: Any) -> bool:
    """A number, or null: what the kit writes for a metric with nothing to measure."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _columns(value: Any) -> bool:
    """[key, header, percent, mean] per column a recipe declared."""
    return isinstance(value, list) and all(
        isinstance(c, list) and len(c) == 4 and isinstance(c[0], str) and isinstance(c[1], str) for c in value)


def record_problem(record: dict[str, Any]) -> str | None:
    """The first field of `record` the kit could not read ("val_ppl = 'x'"), or None when it can read all."""
    checks = {
        "model": isinstance(record.get("model"), str) and record["model"] != "",
        "samples": _integer(record.get("samples"), 1),
        "seed": "seed" not in record or _integer(record["seed"], -(2**63)),
        "variant": isinstance(record.get("variant", ""), str),
        "train_tokens": _integer(record.get("train_tokens"), 1),
        "val_tokens": _integer(record.get("val_tokens"), 1),
        "val_ppl": "val_ppl" in record and _number_or_null(record["val_ppl"]),
        "val_acc": "val_acc" in record and _number_or_null(record["val_acc"]),
        "metrics": isinstance(record.get("metrics", {}), dict)
                   and all(_number_or_null(v) for v in record.get("metrics", {}).values()),
        "columns": _columns(record.get("columns", [])),
        "flags": isinstance(record.get("flags", {}), dict),
        "notes": isinstance(record.get("notes", []), list),
        "sweep": isinstance(record.get("sweep", {}), dict),
    }
    bad = next((key for key, ok in checks.items() if not ok), None)
    if bad is None:
        return None
    return f"{bad} = {record[bad]!r}" if bad in record else f"no {bad}"


def read_json_object(file: Path) -> dict[str, Any] | None:
    """The JSON object in `file`, or None when it is missing, unreadable or no object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_unit_records(run_path: Path) -> dict[str, tuple[Path, dict[str, Any] | None, str | None]]:
    """Every unit record file of a run directory by unit id: its path, its record, and what makes it
    unreadable (record None) or None."""
    found: dict[str, tuple[Path, dict[str, Any] | None, str | None]] = {}
    for file in sorted((run_path / UNITS_DIR).glob(f"*/{RECORD}")):
        record = read_json_object(file)
        problem = "not a JSON object" if record is None else record_problem(record)
        found[file.parent.name] = (file, None if problem else record, problem)
    return found


def unit_records(run_path: Path) -> list[dict[str, Any]]:
    """The readable unit records of a run directory: what its results.jsonl holds once rebuilt, read
    directly so `scaling` and `compare` see every finished unit while other units still run."""
    return [record for _, record, _ in read_unit_records(run_path).values() if record is not None]
