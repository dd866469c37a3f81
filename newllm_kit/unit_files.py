"""The files of one unit in a run directory: `units/<id>/` holds its claim, its finished record, its
last failure and (for a unit run as a job) its metrics lines.

Each unit's record is its own atomically written file, so processes finishing different units at
the same moment never overwrite each other's results; results.jsonl, results.csv and summary.json
are tables rebuilt from these files.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from .claims import job_id
from .result_records import RECORD, UNITS_DIR
from .rundir import RunDir
from .strict_json import json_text

FAILED = "failed.json"
CLAIM = "claim.json"
METRICS = "metrics.jsonl"  # a unit run as a job logs here; a whole run in one process logs to ./metrics.jsonl
TABLES_CLAIM = ".tables.claim"  # held while results.* and summary.json are rebuilt
META_CLAIM = ".meta.claim"  # held while meta.json is read and rewritten


def unit_dir(run: RunDir, unit: str) -> Path:
    return run.unit_folder(UNITS_DIR, unit)


def claims_dir(run: RunDir) -> Path:
    """units/, where the short claims live (created on first use)."""
    folder = run.inside(run.path / UNITS_DIR)
    folder.mkdir(exist_ok=True)
    return folder


def write_record(run: RunDir, unit: str, record: dict[str, Any]) -> None:
    """The unit's finished record, whole or not at all; its earlier failure no longer stands."""
    folder = unit_dir(run, unit)
    folder.mkdir(parents=True, exist_ok=True)
    run.write_text(f"{UNITS_DIR}/{unit}/{RECORD}", json_text(record) + "\n")
    run.inside(folder / FAILED).unlink(missing_ok=True)


def write_failure(run: RunDir, unit: str, error: str, exit_code: int) -> None:
    """What `status` shows for a unit whose last attempt failed."""
    unit_dir(run, unit).mkdir(parents=True, exist_ok=True)
    run.write_json(f"{UNITS_DIR}/{unit}/{FAILED}", {"error": error, "exit_code": exit_code,
                                                    "host": socket.gethostname(), "job": job_id(),
                                                    "time": time.time()})
