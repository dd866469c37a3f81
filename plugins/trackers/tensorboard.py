"""The `tensorboard` tracker: each unit's run as TensorBoard event files, through tensorboardX (or
torch.utils.tensorboard, which needs the tensorboard package). TensorBoard keeps scalars and text, not
files: the configuration is a text entry, the record's numbers are scalars, and plots stay in plots/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.protocols import TrackedRun

from . import record_values, require, row_values

FOLDER = "tensorboard"  # RUN_DIR/tensorboard/<unit>/attempt-<n>: one TensorBoard run per unit and start


class TensorBoardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(None, description="Folder for the event files (default RUN_DIR/tensorboard); "
                             "a unit's run is <dir>/<experiment>/<run directory>/<unit>/attempt-<n> there")


class TensorBoardTracker:
    def __init__(self, settings: TensorBoardSettings | None = None) -> None:
        self.settings = settings or TensorBoardSettings()
        self.writer: Any = None
        self.last_step = 0

    def check(self) -> None:
        require("tensorboard", ("tensorboardX", "tensorboard"), "tensorboard")

    def start(self, run: TrackedRun) -> None:
        where = (self.settings.dir / run.experiment / run.group if self.settings.dir is not None
                 else run.inside(FOLDER))
        self.writer = _summary_writer()(str(where / run.unit / f"attempt-{run.attempt}"), flush_secs=10)

    def log_params(self, params: dict[str, Any]) -> None:
        lines = [f"| `{key}` | `{json.dumps(value)}` |" for key, value in params.items()]
        self.writer.add_text("config", "\n".join(["| key | value |", "|---|---|", *lines]), 0)

    def log_metrics(self, row: dict[str, Any], step: int) -> None:
        for tag, value in row_values(row).items():
            self.writer.add_scalar(tag, value, step)
        self.last_step = step

    def log_record(self, record: dict[str, Any]) -> None:
        for tag, value in record_values(record).items():
            self.writer.add_scalar(tag, value, self.last_step)

    def log_artifacts(self, paths: list[Path]) -> None:
        del paths  # TensorBoard has no place for files

    def end(self, status: str) -> None:
        self.writer.add_text("status", status, self.last_step)
        self.writer.close()


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter, else torch's (the same interface)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


@hookimpl
def register_trackers(register: Any) -> None:
    register("tensorboard", TensorBoardTracker, settings=TensorBoardSettings,
             description="TensorBoard event files (tensorboardX), under RUN_DIR/tensorboard by default")
