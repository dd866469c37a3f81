"""The `mlflow` tracker: each unit's run in an MLflow tracking store, through `mlflow.MlflowClient`. By
default the store is SQLite inside the run directory (RUN_DIR/mlflow.db, files in RUN_DIR/mlflow-artifacts:
MLflow's file store is deprecated); `uri` names any other store or server. The experiment is the kit's
experiment; each unit's run is named by the unit and tagged with the run directory, which groups them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.protocols import TrackedRun

from . import record_values, require, row_values

STORE, ARTIFACTS = "mlflow.db", "mlflow-artifacts"
# MLflow's limits (mlflow.utils.validation): longer keys are skipped, longer values cut.
KEY_LENGTH, VALUE_LENGTH, PARAMS_PER_BATCH = 250, 6000, 100
END = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(None, description="Tracking URI: sqlite:///…, http(s)://server, databricks … "
                            "(default sqlite:///RUN_DIR/mlflow.db)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the experiment's name)")


class MLflowTracker:
    def __init__(self, settings: MLflowSettings | None = None) -> None:
        self.settings = settings or MLflowSettings()
        self.client: Any = None
        self.run_id = ""
        self.last_step = 0

    def check(self) -> None:
        require("mlflow", ("mlflow",), "mlflow")

    def start(self, run: TrackedRun) -> None:
        from mlflow import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables" per store
        artifacts = None
        uri = self.settings.uri
        if uri is None:
            uri = f"sqlite:///{run.inside(STORE)}"
            artifacts = run.inside(ARTIFACTS).as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = self.settings.experiment or run.experiment
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(
            name, artifact_location=artifacts)
        tags = {"newllm.unit": run.unit, "newllm.run_dir": run.group, "newllm.attempt": str(run.attempt)}
        self.run_id = self.client.create_run(experiment, run_name=run.unit, tags=tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        kept = [Param(key, str(value)[:VALUE_LENGTH]) for key, value in params.items() if len(key) <= KEY_LENGTH]
        for first in range(0, len(kept), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=kept[first:first + PARAMS_PER_BATCH])

    def log_metrics(self, row: dict[str, Any], step: int) -> None:
        self._log(row_values(row), step)
        self.last_step = step

    def log_record(self, record: dict[str, Any]) -> None:
        self._log(record_values(record), self.last_step)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, END.get(status, "FAILED"))

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items() if len(key) <= KEY_LENGTH]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


@hookimpl
def register_trackers(register: Any) -> None:
    register("mlflow", MLflowTracker, settings=MLflowSettings,
             description="MLflow runs, in RUN_DIR/mlflow.db by default or on any tracking server")
