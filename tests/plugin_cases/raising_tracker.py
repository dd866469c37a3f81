"""A tracker whose every call raises (a tracking server that is down), and one that records every call:
trackers observe, so a run must finish with or without them, and each hears how its unit ended."""

from pathlib import Path
from typing import Any

from newllm_kit import hookimpl
from newllm_kit.protocols import TrackedRun

CALLS: list[tuple[str, Any]] = []  # (method, its first argument) of every call to either tracker


class RaisingTracker:
    def __init__(self, settings: None = None) -> None:
        del settings

    def _fail(self, method: str, argument: Any) -> None:
        CALLS.append((f"raising.{method}", argument))
        raise ConnectionError(f"tracking server unreachable\n(during {method})")

    def start(self, run: TrackedRun) -> None:
        self._fail("start", run)

    def log_params(self, params: dict[str, Any]) -> None:
        self._fail("log_params", params)

    def log_metrics(self, row: dict[str, Any], step: int) -> None:
        self._fail("log_metrics", row)

    def log_record(self, record: dict[str, Any]) -> None:
        self._fail("log_record", record)

    def log_artifacts(self, paths: list[Path]) -> None:
        self._fail("log_artifacts", paths)

    def end(self, status: str) -> None:
        self._fail("end", status)


class RecordingTracker(RaisingTracker):
    def _fail(self, method: str, argument: Any) -> None:
        CALLS.append((f"recording.{method}", argument))


@hookimpl
def register_trackers(register: Any) -> None:
    register("raising", RaisingTracker, description="raises on every call")
    register("recording", RecordingTracker, description="records every call")
