"""The `sequential` launcher: every unit, one after another, in this process (under torchrun, in
every rank of it). The core runs the units itself; this plugin only names that choice."""

from __future__ import annotations

from typing import Any

from newllm_kit import hookimpl
from newllm_kit.protocols import LaunchRequest


class SequentialLauncher:
    in_process = True

    def __init__(self, settings: None = None) -> None:
        del settings

    def launch(self, request: LaunchRequest) -> str | None:
        raise RuntimeError("the sequential launcher runs in process; the core never calls its launch")


@hookimpl
def register_launchers(register: Any) -> None:
    register("sequential", SequentialLauncher, description="every unit, one after another, in this process")
