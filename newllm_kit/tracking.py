"""Trackers observe, never decide: each backend in `[tracking] backends` gets one run per unit, on rank 0,
and mirrors what the kit records (metrics.jsonl stays the record and the source of every table, plot and
fit). Every call to a tracker is guarded: the first exception disables that backend for the rest of the
run, with one warning and an entry in meta.json's `trackers_disabled`; the run itself goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from .claims import short_claim
from .config import Choice, ExperimentConfig
from .config.reading import dotted_keys
from .protocols import TrackedRun
from .registry import is_plugin_error, one_line, signals_seen
from .rundir import RunDir
from .unit_files import META_CLAIM, claims_dir

DISABLED = "trackers_disabled"  # meta.json: {backend: its one-line error}, for this start of the run


class Tracking:
    """The configured trackers of one process's run: which backends are still alive, across its units.
    Only rank 0 tracks; elsewhere every unit gets a tracking that does nothing."""

    def __init__(self, config: ExperimentConfig, run: RunDir, rank: int, say: Callable[[str], None]) -> None:
        backends = config.schema.tracking.backends if rank == 0 else []
        self.choices: list[Choice] = [config.trackers[name] for name in backends]
        self.run, self.say = run, say
        self.disabled: dict[str, str] = {}
        self.plots_failed = False

    def unit(self, config: ExperimentConfig, unit: str, attempt: int) -> UnitTracking:
        """Start each live backend's run for `unit` and give it the unit's configuration (`config`: the
        unit's own, with its seed and sweep variant) as dotted parameters."""
        run = TrackedRun(unit=unit, attempt=attempt, experiment=config.schema.experiment.name,
                         group=self.run.path.name, run_dir=self.run.path)
        tracked = UnitTracking(self, unit)
        for choice in self.choices:
            name = choice.component.name
            if name not in self.disabled:
                ok, tracker = self.guarded(name, choice.build)
                if ok:
                    tracked.trackers[name] = tracker
        if tracked.trackers:
            resolved = {k: v for k, v in config.resolved().items() if k != "tracking"}  # a server URI may hold secrets
            tracked.call("start", run)
            tracked.call("log_params", dotted_keys(resolved))
        return tracked

    def guarded(self, name: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, what `call` returned), or (False, None) once it raised: then `name` is disabled. What a
        tracker prints goes to stderr (stdout is one JSON document under `--json`). A real Ctrl-C or
        SIGTERM still stops the run."""
        with redirect_stdout(sys.stderr), signals_seen() as seen:
            try:
                return True, call()
            except BaseException as error:
                if not is_plugin_error(error, seen):
                    raise
                self.disable(name, one_line(error))
                return False, None

    def disable(self, name: str, line: str) -> None:
        self.disabled[name] = line
        self.say(f"warning: tracker {name!r} disabled for the rest of the run: {line}")
        with short_claim(claims_dir(self.run) / META_CLAIM):  # jobs of one run share meta.json
            recorded = self.run.read_json("meta.json")
            recorded = recorded if isinstance(recorded, dict) else {}
            before = recorded.get(DISABLED)
            self.run.write_json("meta.json", {**recorded, DISABLED: {**(before if isinstance(before, dict) else {}),
                                                                     name: line}})

    def plots(self, record: dict[str, Any], unit: str) -> list[Path]:
        """The unit's training-curve PNG (plots/unit-<unit>.png, as `newllm-kit plot` draws it), or none
        where it cannot be drawn (matplotlib is optional): said once per run."""
        from .plots import run_curves, unit_plot

        try:
            out = self.run.inside(self.run.path / "plots")
            out.mkdir(exist_ok=True)
            return [unit_plot(record, unit, run_curves(self.run.path).get(unit, {}), out)]
        except Exception as error:  # drawn for the trackers alone: never a reason to fail the run
            if not self.plots_failed:
                self.plots_failed = True
                self.say(f"warning: trackers get no plots in this run: {one_line(error)}")
            return []


class UnitTracking:
    """One unit's runs, one per live backend. Used as a context manager: leaving it reports how the unit
    ended (an exception: "failed", a KeyboardInterrupt: "interrupted", else "finished")."""

    def __init__(self, tracking: Tracking, unit: str) -> None:
        self.tracking, self.unit = tracking, unit
        self.trackers: dict[str, Any] = {}
        self.step = 0

    def call(self, method: str, *args: Any) -> None:
        """`method(*args)` of every live tracker; one that raises is dropped (and disabled for the run)."""
        for name, tracker in list(self.trackers.items()):
            ok, _ = self.tracking.guarded(name, partial(getattr(tracker, method), *args))
            if not ok:
                del self.trackers[name]

    def log_metrics(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row, as written; `step` counts the unit's rows in this run."""
        if self.trackers:
            self.call("log_metrics", dict(row), self.step)
        self.step += 1

    def finish(self, record: dict[str, Any]) -> None:
        """The unit finished: its results record and its plots."""
        if self.trackers:
            self.call("log_record", record)
        paths = self.tracking.plots(record, self.unit) if self.trackers else []
        if paths:
            self.call("log_artifacts", paths)

    def __enter__(self) -> UnitTracking:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        status = "finished" if error is None else "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.call("end", status)
        self.trackers.clear()
