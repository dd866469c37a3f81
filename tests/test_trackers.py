"""Trackers observe, never decide: each backend holds every metrics.jsonl row and each unit's record as its
own reader sees them (TensorBoard's event files, MLflow's store through its client, W&B's offline run
file), and a tracker that fails is disabled once while the run finishes exactly as without it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import load_case
from fixtures import synthetic_experiment
from test_recipe_outputs import main

from newllm_kit.config import load_config
from newllm_kit.plugins import Plugins, load_plugins
from newllm_kit.resume import check_resume_compatible
from newllm_kit.run import execute
from newllm_kit.rundir import RunDir
from newllm_kit.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = synthetic_experiment("tracked") + """
[lm]
epochs = 3
patience = 3
batch_size = 4
window = 16
warmup_steps = 2
learning_rate = 0.003

[[models]]
label = "G"
architecture = "gru"
layers = 1
hidden_size = 16
embedding_dim = 16
"""
ALL_THREE = '\n[tracking]\nbackends = ["tensorboard", "mlflow", "wandb"]\n'
UNITS = ("G-12", "G-24")
IDENTITY = ("unit", "phase", "attempt")  # a row's identity: the tracker run and the tag name these
TIMING = "seconds"  # wall-clock fields: the only numbers two runs of one experiment may differ in


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.toml"
    path.write_text(text)
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows_of(run_dir: Path, unit: str) -> list[dict[str, Any]]:
    """The unit's metrics.jsonl rows in the order written: row i is step i in every tracker."""
    return [row for row in lines(run_dir / "metrics.jsonl") if row["unit"] == unit]


def expected(row: dict[str, Any]) -> dict[str, float]:
    """What every tracker must hold of a metrics row: each number as `<phase>/<field>`."""
    return {f"{row['phase']}/{key}": value for key, value in row.items()
            if key not in IDENTITY and isinstance(value, int | float)}


def records(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {f"{r['model']}-{r['samples']}": r for r in lines(run_dir / "results.jsonl")}


def without_timing(value: Any) -> Any:
    """Rows or records without their wall-clock fields, at any depth (a record's per-epoch history too)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k != TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


# -- the readers of each backend -----------------------------------------------------------------------------

def tensorboard_events(folder: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """Scalars {tag: {step: value}} and texts {tag: text} of a TensorBoard run folder, read from its event
    files (TFRecords of `Event` protos: length, its CRC, the data, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                else:
                    texts[value.tag.removesuffix("/text_summary")] = value.tensor.string_val[0].decode()
    return scalars, texts


def wandb_records(file: Path) -> list[Any]:
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-style records in 32 KiB blocks (CRC, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, found = file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def wandb_runs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each offline W&B run under RUN_DIR/wandb, by name: its group, config, history rows by step, summary
    and exit code, as `wandb sync` would upload them."""
    runs: dict[str, dict[str, Any]] = {}
    for file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "exit_code": None}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["group"], run["project"] = (record.run.display_name, record.run.run_group,
                                                             record.run.project)
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"][record.history.step.num] = items
            elif kind == "summary":
                run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                       for u in record.summary.update})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs[run["name"]] = run
    return runs


def mlflow_runs(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """MLflow's client on the run's default store, and its runs by name (one per unit)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    return client, {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def assert_mlflow_holds_every_row(run_dir: Path) -> None:
    client, runs = mlflow_runs(run_dir)
    assert sorted(runs) == list(UNITS)
    for unit, run in runs.items():
        rows = rows_of(run_dir, unit)
        for tag in expected(rows[0]):
            history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
            assert history == [(step, expected(row)[tag]) for step, row in enumerate(rows)], (unit, tag)


def assert_wandb_holds_every_row(run_dir: Path) -> None:
    runs = wandb_runs(run_dir)
    assert sorted(runs) == list(UNITS)
    for unit, run in runs.items():
        for step, row in enumerate(rows_of(run_dir, unit)):
            held = {k: v for k, v in run["history"][step].items() if k in expected(row)}
            assert held == expected(row), (unit, step)


# -- the runs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fakes() -> ModuleType:
    """The raising and recording trackers, and the calls they got (`CALLS`)."""
    return load_case("raising_tracker")


@pytest.fixture(scope="module")
def plugins(fakes: ModuleType) -> Plugins:
    return load_plugins(extra=[("raising_tracker", fakes)])


@pytest.fixture(scope="module")
def untracked(tmp_path_factory: pytest.TempPathFactory, plugins: Plugins) -> Path:
    folder = tmp_path_factory.mktemp("untracked")
    return Path(execute(write(folder, EXPERIMENT), [], folder / "runs", False, "none", plugins)["run_dir"])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """All three built-in trackers through the installed command (entry points, `--json`), in a process of
    its own: stdout as its file descriptor saw it, W&B's service process included."""
    folder = tmp_path_factory.mktemp("tracked")
    done = subprocess.run([sys.executable, "-m", "newllm_kit", "run", str(write(folder, EXPERIMENT + ALL_THREE)),
                           "--out", str(folder / "runs"), "--json"], capture_output=True, text=True, cwd=folder,
                          timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    [run_dir] = [p for p in (folder / "runs" / "tracked").iterdir() if not p.name.startswith(".")]
    return run_dir, done


@pytest.fixture(scope="module")
def one_failing(tmp_path_factory: pytest.TempPathFactory, plugins: Plugins, fakes: ModuleType) -> tuple[Path, str]:
    """All three, TensorBoard failing at its first call (its folder is a file), and a tracker whose every
    call raises; returns the run directory and what the run said on stderr."""
    folder = tmp_path_factory.mktemp("one_failing")
    (folder / "a-file").write_text("not a folder\n")
    settings = f'\n[tracking.tensorboard]\ndir = "{folder / "a-file"}"\n'
    text = EXPERIMENT + ALL_THREE.replace('"wandb"]', '"wandb", "raising"]') + settings
    said = io.StringIO()
    fakes.CALLS.clear()
    with redirect_stderr(said):
        result = execute(write(folder, text), [], folder / "runs", False, "plain", plugins)
    return Path(result["run_dir"]), said.getvalue()


# -- each backend, read back ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_event_files_hold_every_metrics_row_the_record_and_the_config(
        tracked: tuple[Path, Any]) -> None:
    run_dir, _ = tracked
    for unit, record in records(run_dir).items():
        scalars, texts = tensorboard_events(run_dir / "tensorboard" / unit / "attempt-1")
        rows = rows_of(run_dir, unit)
        for step, row in enumerate(rows):
            for tag, value in expected(row).items():  # TensorBoard keeps float32
                assert scalars[tag][step] == float(np.float32(value)), (unit, tag, step)
        assert set(scalars["lm/epoch"]) == set(range(len(rows))) == {0, 1, 2}
        last = len(rows) - 1
        for key in ("val_ppl", "val_acc", "train_tokens", "samples"):
            assert scalars[f"record/{key}"] == {last: float(np.float32(record[key]))}, key
        assert scalars["record/params.total"] == {last: record["params"]["total"]}
        assert "| `lm.epochs` | `3` |" in texts["config"] and "| `models.0.label` | `\"G\"` |" in texts["config"]
        assert texts["status"] == "finished"


@pytest.mark.slow
def test_mlflow_store_holds_every_metrics_row_the_record_the_config_and_the_plot(tracked: tuple[Path, Any]) -> None:
    run_dir, _ = tracked
    assert_mlflow_holds_every_row(run_dir)
    client, runs = mlflow_runs(run_dir)
    for unit, record in records(run_dir).items():
        run = runs[unit]
        assert run.info.status == "FINISHED"
        assert run.data.tags["newllm.run_dir"] == run_dir.name and run.data.tags["newllm.unit"] == unit
        assert run.data.params["lm.epochs"] == "3" and run.data.params["experiment.samples"] == "[12, 24]"
        assert not any(key.startswith("tracking.") for key in run.data.params)
        for key in ("val_ppl", "val_acc", "train_tokens", "samples"):
            assert run.data.metrics[f"record/{key}"] == record[key], key
        assert [f.path for f in client.list_artifacts(run.info.run_id, "plots")] == [f"plots/unit-{unit}.png"]
    assert sorted(p.name for p in (run_dir / "mlflow-artifacts").iterdir()) == sorted(r.info.run_id
                                                                                      for r in runs.values())


@pytest.mark.slow
def test_wandb_offline_runs_hold_every_metrics_row_the_record_and_the_config(tracked: tuple[Path, Any]) -> None:
    run_dir, _ = tracked
    assert_wandb_holds_every_row(run_dir)
    runs = wandb_runs(run_dir)
    for unit, record in records(run_dir).items():
        run = runs[unit]
        assert (run["group"], run["project"], run["exit_code"]) == (run_dir.name, "tracked", 0)
        assert run["config"]["lm.epochs"] == 3 and run["config"]["models.0.architecture"] == "gru"
        for key in ("val_ppl", "val_acc", "train_tokens", "samples"):
            assert run["summary"][f"record/{key}"] == record[key], key
        assert any(key.startswith(f"plots/unit-{unit}") for key in run["history"][2])


@pytest.mark.slow
def test_trackers_change_no_result_and_print_nothing_on_stdout(tracked: tuple[Path, Any], untracked: Path) -> None:
    run_dir, done = tracked
    document = json.loads(done.stdout)  # one JSON document, nothing from W&B or MLflow around it
    assert document["run_dir"] == str(run_dir)
    assert "warning" not in done.stderr
    assert without_timing(lines(run_dir / "metrics.jsonl")) == without_timing(lines(untracked / "metrics.jsonl"))
    assert without_timing(records(run_dir)) == without_timing(records(untracked))
    assert "trackers_disabled" not in json.loads((run_dir / "meta.json").read_text())
    RunDir(run_dir).check_links()  # wandb/latest-run is a link, but one inside the run: no error


# -- a tracker that fails ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failing_tracker_is_disabled_once_and_the_run_finishes_as_without_it(
        one_failing: tuple[Path, str], untracked: Path, fakes: ModuleType) -> None:
    run_dir, said = one_failing
    assert without_timing(lines(run_dir / "metrics.jsonl")) == without_timing(lines(untracked / "metrics.jsonl"))
    assert without_timing(records(run_dir)) == without_timing(records(untracked))
    warnings = [line for line in said.splitlines() if "warning: tracker" in line]
    assert len(warnings) == 2 and warnings[0].endswith(
        "warning: tracker 'tensorboard' disabled for the rest of the run: NotADirectoryError: [Errno 20] Not a "
        f"directory: '{run_dir.parents[2] / 'a-file' / 'tracked'}'")
    assert warnings[1].endswith("warning: tracker 'raising' disabled for the rest of the run: ConnectionError: "
                                "tracking server unreachable")
    assert [method for method, _ in fakes.CALLS] == ["raising.start"]  # then disabled: never called again
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished"
    assert meta["trackers_disabled"] == {"tensorboard": warnings[0].split("run: ", 1)[1],
                                         "raising": "ConnectionError: tracking server unreachable"}
    assert not (run_dir / "tensorboard").exists()
    assert_mlflow_holds_every_row(run_dir)
    assert_wandb_holds_every_row(run_dir)


@pytest.mark.parametrize(("stop", "status"), [(None, "finished"), (RuntimeError("loss is NaN"), "failed"),
                                               (KeyboardInterrupt("SIGTERM"), "interrupted")])
def test_each_live_tracker_hears_how_its_unit_ended(tmp_path: Path, plugins: Plugins, fakes: ModuleType,
                                                    stop: BaseException | None, status: str) -> None:
    config = load_config(write(tmp_path, EXPERIMENT + '\n[tracking]\nbackends = ["recording"]\n'), plugins.registry)
    run = RunDir.create(tmp_path / "runs", "tracked")
    fakes.CALLS.clear()
    said: list[str] = []
    row = {"unit": "G-12", "phase": "lm", "attempt": 1, "epoch": 1, "val_loss": 5.5}
    try:
        with Tracking(config, run, 0, said.append).unit(config, "G-12", 1) as tracker:
            tracker.log_metrics(row)
            if stop is not None:
                raise stop
            tracker.finish({"model": "G", "samples": 12, "train_tokens": 857, "val_ppl": 245.0})
    except (RuntimeError, KeyboardInterrupt) as error:
        assert error is stop
    calls = [(method.removeprefix("recording."), argument) for method, argument in fakes.CALLS]
    assert [method for method, _ in calls] == ["start", "log_params", "log_metrics",
                                               *(["log_record", "log_artifacts"] if stop is None else []), "end"]
    started = calls[0][1]
    assert (started.unit, started.attempt, started.experiment, started.group) == ("G-12", 1, "tracked", run.path.name)
    assert calls[1][1]["lm.epochs"] == 3 and calls[2][1] == row and calls[-1][1] == status
    if stop is None:
        assert calls[3][1]["val_ppl"] == 245.0 and calls[4][1] == [run.path / "plots" / "unit-G-12.png"]
        assert calls[4][1][0].stat().st_size > 0
    assert said == []


def test_only_rank_0_tracks(tmp_path: Path, plugins: Plugins, fakes: ModuleType) -> None:
    config = load_config(write(tmp_path, EXPERIMENT + '\n[tracking]\nbackends = ["recording"]\n'), plugins.registry)
    fakes.CALLS.clear()
    with Tracking(config, RunDir.create(tmp_path / "runs", "tracked"), 1, print).unit(config, "G-12", 1) as tracker:
        tracker.log_metrics({"unit": "G-12", "phase": "lm", "attempt": 1, "epoch": 1})
    assert fakes.CALLS == []


# -- configuration -------------------------------------------------------------------------------------------

def test_a_tracker_whose_package_is_missing_is_one_line_at_validation_with_the_install_command(
        tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = write(tmp_path, EXPERIMENT + ALL_THREE)
    for command in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "runs")]):
        assert main(command, plugins, monkeypatch) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {path}: tracking.backends.1: tracker 'mlflow' needs the mlflow package, which is not installed "
            "here: pip install 'newllm-kit[mlflow]'"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("tracking", "error"), [
    ('backends = ["mlfow"]', "tracking.backends.0: unknown tracker 'mlfow'; did you mean 'mlflow'?"),
    ('backends = ["wandb", "wandb"]', "tracking.backends.1: 'wandb' is listed twice"),
    ('backends = ["wandb"]\nwandb = { mode = "online", projekt = "x" }',
     "tracking.wandb.projekt: unknown key; did you mean 'project'?"),
    ('backend = ["wandb"]', "tracking.backend: unknown key; did you mean 'backends'?"),
])
def test_a_tracking_mistake_is_a_one_line_config_error(tmp_path: Path, plugins: Plugins,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], tracking: str,
                                                       error: str) -> None:
    path = write(tmp_path, EXPERIMENT + f"\n[tracking]\n{tracking}\n")
    assert main(["validate", str(path)], plugins, monkeypatch) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: {error}")


def test_tracking_settings_may_change_when_a_run_continues(tmp_path: Path, plugins: Plugins) -> None:
    saved = tmp_path / "config.resolved.toml"
    saved.write_text(load_config(write(tmp_path, EXPERIMENT), plugins.registry).resolved_toml())
    now = load_config(write(tmp_path, EXPERIMENT + ALL_THREE + '\n[tracking.mlflow]\nuri = "http://mlflow:5000"\n'),
                      plugins.registry)
    check_resume_compatible(saved, now)  # raises where a setting that shapes results differs
    assert now.resolved()["tracking"] == {"backends": ["tensorboard", "mlflow", "wandb"], "tensorboard": {},
                                          "mlflow": {"uri": "http://mlflow:5000"}, "wandb": {"mode": "offline"}}
