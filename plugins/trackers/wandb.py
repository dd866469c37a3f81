"""The `wandb` tracker: each unit's run in Weights & Biases, `offline` by default (the run's files under
RUN_DIR/wandb, uploaded later with `wandb sync`) or `online`. Runs are named by unit and grouped by the run
directory; the project is the experiment's name unless set. W&B prints nothing and captures no console
output here: stdout stays the command's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.protocols import TrackedRun

from . import record_values, require, row_values

EXIT_CODES = {"finished": 0, "failed": 1, "interrupted": 130}  # 130: the CLI's own for an interrupted run


class WandbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online"] = Field("offline", description="offline: files only, for `wandb sync` "
                                               "later; online: to the W&B server (needs `wandb login`)")
    project: str | None = Field(None, description="W&B project (default: the experiment's name)")
    entity: str | None = Field(None, description="W&B user or team (default: your default entity)")
    dir: Path | None = Field(None, description="Where W&B writes its wandb/ folder (default: the run directory)")


class WandbTracker:
    def __init__(self, settings: WandbSettings | None = None) -> None:
        self.settings = settings or WandbSettings()
        self.run: Any = None

    def check(self) -> None:
        require("wandb", ("wandb",), "wandb")

    def start(self, run: TrackedRun) -> None:
        import wandb

        folder = self.settings.dir if self.settings.dir is not None else run.inside("wandb").parent  # W&B adds wandb/
        quiet = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                               x_save_requirements=False)
        self.run = wandb.init(mode=self.settings.mode, dir=str(folder), project=self.settings.project or run.experiment,
                              entity=self.settings.entity, group=run.group, name=run.unit, job_type="unit",
                              tags=[f"attempt-{run.attempt}"], reinit="create_new", settings=quiet)
        if self.settings.mode == "online" and (self.run.disabled or self.run.offline):  # W&B fell back silently
            raise RuntimeError("W&B is not logged in here; run `wandb login` or set WANDB_API_KEY first")

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, row: dict[str, Any], step: int) -> None:
        self.run.log(row_values(row), step=step)

    def log_record(self, record: dict[str, Any]) -> None:
        self.run.summary.update(record_values(record))

    def log_artifacts(self, paths: list[Path]) -> None:
        import wandb

        self.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in paths})

    def end(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))


@hookimpl
def register_trackers(register: Any) -> None:
    register("wandb", WandbTracker, settings=WandbSettings,
             description="Weights & Biases runs, offline under RUN_DIR/wandb by default")
