"""`newllm-kit status RUN_DIR`: how each unit of a run stands, read from the run directory alone (its
unit records, claims, failures and checkpoints), never from a scheduler's accounting, so it says the
same on a laptop, a login node or inside a job. `Watch` follows launched units the same way while
they run."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from .claims import describe, inspect
from .config import ExperimentConfig
from .experiment import Unit, finished_units, stale_after
from .result_records import RECORD, UNITS_DIR, read_json_object
from .rundir import RunDir
from .unit_files import CLAIM, FAILED


@dataclass(frozen=True)
class UnitStatus:
    unit: str
    state: str  # finished | running | interrupted | failed | pending
    detail: str


def _checkpoint_stage(run: RunDir, unit: str) -> str | None:
    try:
        name = (run.path / "checkpoints" / unit / "LATEST").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name.rsplit("-", 1)[0] or None


def unit_statuses(run: RunDir, config: ExperimentConfig, units: list[Unit]) -> list[UnitStatus]:
    """Each unit's state, in plan order:
    finished (its record), running (a live claim: who, which phase, last heartbeat), interrupted (a
    claim whose process is gone: it resumes from its checkpoint), failed (its last attempt's one-line
    error) or pending."""
    done = finished_units(run, config, units, lambda _: None)
    stale = stale_after(config)
    statuses = []
    for unit in units:
        folder = run.path / UNITS_DIR / unit.id
        stage = _checkpoint_stage(run, unit.id)
        resumes = f"; resumes from its {stage!r} checkpoint" if stage else ""
        if unit.key in done:
            record = done[unit.key]
            statuses.append(UnitStatus(unit.id, "finished", f"val_ppl {_number(record.get('val_ppl'))}"))
            continue
        claim = inspect(folder / CLAIM, stale)
        if claim is not None:
            holder, gone = claim
            who = describe(holder or {})
            if gone is None:
                beat = (holder or {}).get("heartbeat")
                ago = f", heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, int | float) else ""
                phase = (holder or {}).get("phase") or "starting"
                statuses.append(UnitStatus(unit.id, "running", f"claimed by {who}, phase {phase}{ago}"))
                continue
            statuses.append(UnitStatus(unit.id, "interrupted", f"claimed by {who}, which is gone ({gone}){resumes}"))
            continue
        failure = read_json_object(folder / FAILED)
        if failure is not None:
            job = f", job {failure['job']}" if failure.get("job") else ""
            where = f" (on {failure['host']}{job})" if failure.get("host") else ""
            statuses.append(UnitStatus(unit.id, "failed", f"{failure.get('error', '?')}{where}{resumes}"))
            continue
        statuses.append(UnitStatus(unit.id, "pending", f"not started{resumes}" if not stage else resumes[2:]))
    return statuses


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def status_document(run: RunDir, config: ExperimentConfig, units: list[Unit]) -> dict[str, Any]:
    statuses = unit_statuses(run, config, units)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    meta = run.read_json("meta.json")
    return {"run_dir": str(run.path), "status": meta.get("status") if isinstance(meta, dict) else None,
            "counts": counts, "units": [asdict(s) for s in statuses]}


class Watch:
    """While launched units run in other processes: report each as it finishes (the progress display's
    unit bar and ETA, or a plain line) or fails, polling the run directory every `interval` seconds."""

    def __init__(self, run: RunDir, units: list[str], progress: Any, interval: float = 2.0) -> None:
        self.run, self.progress, self.interval = run, progress, interval
        self.waiting = list(units)
        self.failures = {unit: self._failure_time(unit) for unit in units}  # earlier failures are old news
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="watch units", daemon=True)

    def _failure_time(self, unit: str) -> Any:
        failure = read_json_object(self.run.path / UNITS_DIR / unit / FAILED)
        return None if failure is None else failure.get("time")

    def poll(self) -> None:
        for unit in list(self.waiting):
            folder = self.run.path / UNITS_DIR / unit
            record = read_json_object(folder / RECORD)
            if record is not None:
                self.waiting.remove(unit)
                self.progress.end_unit(unit, f"val_ppl={_number(record.get('val_ppl'))}")
                continue
            failure = read_json_object(folder / FAILED)
            if failure is not None and failure.get("time") != self.failures[unit]:
                self.failures[unit] = failure.get("time")
                self.progress.message(f"{unit}: failed: {failure.get('error', '?')}")

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
