"""Progress for long work: a rich display with ETA on a terminal, plain log lines otherwise.

Both sinks take the same events (experiment › unit › phase › iteration/epoch), so the loops in
the phases never know which one they talk to. Plain mode prints a line per event at most every
`interval` seconds (and always the last one of a phase), so CI logs stay short.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fields_text(fields: dict[str, float]) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class PlainProgress:
    """Timestamped lines on stderr, throttled."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.unit = ""
        self._last = 0.0
        self._pending: str | None = None
        self._totals: dict[str, int | None] = {}
        self._started = time.monotonic()
        self._units_ended = self._units_total = 0  # a run that fails says so instead of "finished"
        self._announced = False  # experiment() seen: before it, nothing ran that could have finished

    def _emit(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", file=self.stream, flush=True)
        self._last = time.monotonic()
        self._pending = None

    def experiment(self, name: str, units: int) -> None:
        self._units_total, self._announced = units, True
        self._emit(f"experiment {name}: {units} unit(s)")

    def begin_unit(self, label: str, index: int, total: int) -> None:
        self.unit = label
        self._emit(f"unit {index}/{total} {label}: start")

    def end_unit(self, label: str, summary: str) -> None:
        self._units_ended += 1
        self._emit(f"unit {label}: done {summary}")

    def start(self, phase: str, total: int | None) -> None:
        self._totals[phase] = total
        self._emit(f"{self.unit} {phase}: start" + (f" (up to {total})" if total else ""))

    def advance(self, phase: str, **fields: float) -> None:
        text = f"{self.unit} {phase}: {_fields_text(fields)}"
        if time.monotonic() - self._last >= self.interval:
            self._emit(text)
        else:
            self._pending = text

    def finish(self, phase: str) -> None:
        if self._pending:
            self._emit(self._pending)
        self._emit(f"{self.unit} {phase}: done")

    def message(self, text: str) -> None:
        self._emit(text)

    def close(self) -> None:
        seconds = time.monotonic() - self._started
        ended, total = self._units_ended, self._units_total
        if not self._announced:
            self._emit(f"stopped after {seconds:.1f} s, before any unit started")
        else:
            self._emit(f"finished in {seconds:.1f} s" if ended == total else
                       f"stopped after {seconds:.1f} s with {ended} of {total} unit(s) done")


class RichProgress:
    """A live display: one bar for the units of the experiment, one for the current phase.

    Names and messages are plain text (a model label may be `[/x]`), so they are escaped for rich.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.unit = ""
        self._units: TaskID | None = None
        self._phases: dict[str, TaskID] = {}
        self.progress.start()

    def experiment(self, name: str, units: int) -> None:
        self._units = self.progress.add_task(f"[bold]{escape(name)}", total=units, info="")

    def begin_unit(self, label: str, index: int, total: int) -> None:
        self.unit = label

    def end_unit(self, label: str, summary: str) -> None:
        if self._units is not None:
            self.progress.advance(self._units)
        self.console.print(f"[green]✓[/] {escape(label)} {escape(summary)}")

    def start(self, phase: str, total: int | None) -> None:
        self._phases[phase] = self.progress.add_task(escape(f"  {self.unit} › {phase}"), total=total, info="")

    def advance(self, phase: str, **fields: float) -> None:
        task = self._phases.get(phase)
        if task is not None:
            self.progress.update(task, advance=1, info=escape(_fields_text(fields)))

    def finish(self, phase: str) -> None:
        task = self._phases.pop(phase, None)
        if task is not None:
            self.progress.remove_task(task)

    def message(self, text: str) -> None:
        self.console.print(escape(text))

    def close(self) -> None:
        self.progress.stop()


class NullProgress:
    """Discards everything (tests, library use, non-zero ranks)."""

    unit = ""

    def experiment(self, name: str, units: int) -> None: ...
    def begin_unit(self, label: str, index: int, total: int) -> None: ...
    def end_unit(self, label: str, summary: str) -> None: ...
    def start(self, phase: str, total: int | None) -> None: ...
    def advance(self, phase: str, **fields: float) -> None: ...
    def finish(self, phase: str) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def make_progress(mode: str) -> Any:
    """`auto`: rich on a terminal unless NO_COLOR is set; `plain`: log lines; `none`: silent."""
    if mode == "none":
        return NullProgress()
    if mode == "auto" and sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        return RichProgress()
    return PlainProgress()
