"""Grids fanned out: each unit a job (`run RUN_DIR --unit ID`) on the pool launcher, submitit's local
executor or a real one-node Slurm cluster, with the sequential run's numbers, and nothing lost or run
twice when jobs race, die or are requeued."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from slurm_cluster import start_cluster
from test_experiment import TIMING_KEYS, TINY, write_tiny

from newllm_kit import experiment
from newllm_kit.config import load_config
from newllm_kit.errors import RunFailed, UserError
from newllm_kit.plots import run_curves
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute
from newllm_kit.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = ["--set", "runner.threads=1"]
# One model, one size, with ~8 s of Phase 2 (a checkpoint per epoch) for a signal to land in.
LONG = TINY.split("[[models]]")[0].replace("samples = [12, 24]", "samples = [200]").replace(
    "epochs = 3\npatience = 1", "epochs = 40\npatience = 40") + """
[[models]]
label = "A"
variant = "gradual-reduction"
layers = 2
context_dim = 64
embedding_dim = 16
"""


def kit(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "newllm_kit", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})})


def run_dir_under(out: Path) -> Path:
    (found,) = [p for p in out.glob("*/*") if (p / "config.resolved.toml").is_file()]
    return found


def numbers(run_dir: Path) -> list[dict[str, Any]]:
    """results.jsonl without wall-clock times: what must not depend on where the units ran."""
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def status(run_dir: Path) -> dict[str, Any]:
    result = kit("status", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The 4-unit grid run the usual way (one process, one thread): the numbers every launcher must give."""
    folder = tmp_path_factory.mktemp("sequential")
    result = kit("run", str(write_tiny(folder)), *ONE_THREAD, "--out", str(folder / "runs"), "--progress", "none")
    assert result.returncode == 0, result.stderr
    return numbers(run_dir_under(folder / "runs"))


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """LONG's one unit run the usual way, uninterrupted."""
    folder = tmp_path_factory.mktemp("long")
    result = kit("run", str(write_tiny(folder, LONG)), *ONE_THREAD, "--out", str(folder / "runs"), "--progress",
                 "none")
    assert result.returncode == 0, result.stderr
    return numbers(run_dir_under(folder / "runs"))


def new_run_dir(tmp_path: Path, text: str = TINY, overrides: list[str] | None = None) -> Path:
    """A run directory as `run` creates it, before any unit ran."""
    plugins = load_plugins()
    config = load_config(write_tiny(tmp_path, text), plugins.registry, overrides or [])
    run = RunDir.create(tmp_path / "runs", config.schema.experiment.name)
    run.write_text("config.resolved.toml", config.resolved_toml())
    experiment.prepare_corpora(config, run, experiment.plan(config))
    return run.path


# -- a unit is a job ---------------------------------------------------------------------------------

def _fake_unit(log: Path) -> Any:
    def run_unit(config: Any, unit: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{unit.id} {os.getpid()}\n".encode())
        os.close(fd)
        time.sleep(0.05)
        return {"model": unit.label, "samples": unit.samples, "train_tokens": 100 * unit.samples, "val_tokens": 50,
                "val_ppl": float(unit.samples), "val_acc": 0.5, "metrics": {}}
    return run_unit


def _job_worker(run_dir: str, units: list[str], log: str, seed: int) -> None:
    experiment.run_unit = _fake_unit(Path(log))  # type: ignore[assignment]  # the forked process's own copy
    plugins = load_plugins()
    random.Random(seed).shuffle(units)
    for unit in units:
        try:
            execute(Path(run_dir), [], Path(run_dir).parent, False, "none", plugins, unit=unit)
        except UserError as error:
            assert "claimed by" in str(error), error


def test_jobs_racing_for_the_units_of_one_run_run_each_exactly_once(tmp_path: Path) -> None:
    run_dir = new_run_dir(tmp_path, TINY.replace("samples = [12, 24]", "samples = [12, 24, 36, 48]"))
    units = [u.id for u in experiment.plan(load_config(run_dir / "config.resolved.toml", load_plugins().registry))]
    log = tmp_path / "ran.log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_job_worker, args=(str(run_dir), list(units), str(log), seed))
               for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    ran = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(ran) == sorted(units)  # none twice, none lost
    assert len(numbers(run_dir)) == len(units) == 8  # every writer's result is in the rebuilt table
    assert not (run_dir / "results.orphans.jsonl").exists()
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


def test_a_finished_unit_is_never_run_again_and_a_wrong_unit_is_refused(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = new_run_dir(tmp_path)
    monkeypatch.setattr(experiment, "run_unit", _fake_unit(tmp_path / "ran.log"))
    plugins = load_plugins()
    for _ in range(2):
        execute(run_dir, [], tmp_path, False, "none", plugins, unit="A-12")
    assert (tmp_path / "ran.log").read_text().count("A-12") == 1
    with pytest.raises(UserError, match=r"--unit C-12: not a unit of .*\(its units: A-12, A-24, B-12, B-24\)"):
        execute(run_dir, [], tmp_path, False, "none", plugins, unit="C-12")
    with pytest.raises(UserError, match="give the run directory, not an experiment file"):
        execute(write_tiny(tmp_path), [], tmp_path, False, "none", plugins, unit="A-12")


def test_a_job_that_fails_before_its_unit_starts_is_failed_in_status(tmp_path: Path) -> None:
    run_dir = new_run_dir(tmp_path)
    (run_dir / "units" / "A-12").mkdir(parents=True)  # what the coordinator makes for each job
    (run_dir / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    result = kit("run", str(run_dir), "--unit", "A-12")
    assert result.returncode == 2 and "outside the run directory" in result.stderr
    by_unit = {u["unit"]: u for u in status(run_dir)["units"]}
    assert by_unit["A-12"]["state"] == "failed" and "a symbolic link to" in by_unit["A-12"]["detail"]
    assert by_unit["A-24"]["state"] == "pending"


def test_status_of_a_run_written_before_unit_records_keeps_its_results(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = new_run_dir(tmp_path)
    monkeypatch.setattr(experiment, "run_unit", _fake_unit(tmp_path / "ran.log"))
    for unit in ("A-12", "B-24"):
        execute(run_dir, [], tmp_path, False, "none", load_plugins(), unit=unit)
    before = (run_dir / "results.jsonl").read_text()
    shutil.rmtree(run_dir / "units")  # as an older newllm-kit left it: results.jsonl only
    document = status(run_dir)
    assert document["counts"] == {"finished": 2, "pending": 2}
    assert (run_dir / "results.jsonl").read_text() == before


def test_detach_needs_a_launcher_that_submits(tmp_path: Path) -> None:
    plugins = load_plugins()
    for launcher, says in [("sequential", "runs the units in this process"), ("pool", "children of this process")]:
        with pytest.raises(UserError, match=says):
            execute(write_tiny(tmp_path), [f'launcher.name="{launcher}"'], tmp_path / "runs", False, "none", plugins,
                    detach=True)
    assert not [p for p in (tmp_path / "runs").glob("tiny/*") if p.name != ".cache"]  # no run directory left


def test_each_pool_slot_gets_its_gpus_and_a_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from newllm_kit.launch import slot_environments, visible_gpus

    assert slot_environments(2, 2, ["0", "1", "2", "3"], 16) == [
        {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "0,1"},
        {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "2,3"}]
    assert slot_environments(3, 1, [], 2) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]  # the GPUs this process was given, as their names


def test_a_lowered_phase1_budget_reloads_from_the_resolved_config() -> None:
    """config.resolved.toml writes the default min_iterations beside a lower max_iterations: a job (or a
    resume) reading it must accept what the experiment file was accepted with."""
    from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings
    from pydantic import ValidationError

    lowered = CVFPPhase1Settings(max_iterations=4)
    assert CVFPPhase1Settings(**lowered.model_dump()) == lowered
    with pytest.raises(ValidationError, match=r"min_iterations \(6\) is more than max_iterations \(4\)"):
        CVFPPhase1Settings(min_iterations=6, max_iterations=4)


def test_a_job_whose_claim_was_taken_over_drops_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its heartbeat stalled and another process took the unit: that process's record counts."""
    run_dir = new_run_dir(tmp_path)
    fake = _fake_unit(tmp_path / "ran.log")

    def taken_over_meanwhile(config: Any, unit: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        record = fake(config, unit)
        (run_dir / "units" / unit.id / "claim.json").write_text(json.dumps(
            {"host": "node2", "pid": 7, "job": "9_1", "token": "theirs", "heartbeat": time.time()}))
        return record

    monkeypatch.setattr(experiment, "run_unit", taken_over_meanwhile)
    with pytest.raises(RunFailed, match=r"A-12: its claim was taken over by host node2, pid 7, job 9_1 while it ran"):
        execute(run_dir, [], tmp_path, False, "none", load_plugins(), unit="A-12")
    assert not (run_dir / "units" / "A-12" / "record.json").exists()
    assert json.loads((run_dir / "units" / "A-12" / "claim.json").read_text())["token"] == "theirs"


def test_status_reads_each_unit_from_the_run_directory(tmp_path: Path) -> None:
    run_dir = new_run_dir(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        units = run_dir / "units"
        (units / "A-12").mkdir(parents=True)
        (units / "A-12" / "claim.json").write_text(json.dumps(
            {"host": os.uname().nodename, "pid": sleeper.pid, "job": "77_1", "token": "x", "started": time.time(),
             "heartbeat": time.time() - 3, "phase": "phase2"}))
        (units / "A-24").mkdir()
        (units / "A-24" / "claim.json").write_text(json.dumps(
            {"host": "node9", "pid": 5, "job": "77_2", "token": "y", "heartbeat": time.time() - 5000}))
        (units / "B-12").mkdir()
        (units / "B-12" / "failed.json").write_text(json.dumps(
            {"error": "B-12: phase 2, epoch 1, batch 2: non-finite loss", "exit_code": 1, "host": "node3",
             "job": "77_3"}))
        document = status(run_dir)
    finally:
        sleeper.kill()
    by_unit = {u["unit"]: u for u in document["units"]}
    assert by_unit["A-12"]["state"] == "running"
    assert by_unit["A-12"]["detail"].startswith(f"claimed by host {os.uname().nodename}, pid {sleeper.pid}, job "
                                                f"77_1, phase phase2, heartbeat ")
    assert by_unit["A-24"]["state"] == "interrupted"
    assert re.search(r"which is gone \(its heartbeat is 50\d\d s old, stale after 600 s\)$", by_unit["A-24"]["detail"])
    assert by_unit["B-12"] == {"unit": "B-12", "state": "failed", "detail":
                               "B-12: phase 2, epoch 1, batch 2: non-finite loss (on node3, job 77_3)"}
    assert by_unit["B-24"] == {"unit": "B-24", "state": "pending", "detail": "not started"}
    assert document["counts"] == {"running": 1, "interrupted": 1, "failed": 1, "pending": 1}


# -- the pool launcher ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_pool_of_two_workers_gives_the_sequential_numbers(tmp_path: Path, sequential: list[dict[str, Any]]) -> None:
    result = kit("run", str(write_tiny(tmp_path)), *ONE_THREAD, "--launcher", "pool", "--jobs", "2",
                 "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_under(tmp_path / "runs")
    assert numbers(run_dir) == sequential
    assert "1 thread(s) each" in result.stderr
    assert status(run_dir)["counts"] == {"finished": 4}
    curves = run_curves(run_dir)  # each job's metrics lines, for the plots
    assert sorted(curves) == ["A-12", "A-24", "B-12", "B-24"] and all("phase2" in c for c in curves.values())
    assert not list((run_dir / "units").glob("*/claim.json"))


@pytest.mark.slow
def test_a_failed_unit_is_failed_in_status_and_in_the_exit_code(tmp_path: Path) -> None:
    """A sweep whose second variant's Phase 2 diverges: its units fail with their error, the others finish."""
    sweep = TINY.replace("[[models]]", '[sweep]\n"phase2.learning_rate" = [0.01, 1e30]\n\n[[models]]', 1)
    sweep = sweep.split('[[models]]\nlabel = "B"')[0].replace("samples = [12, 24]", "samples = [12]")
    result = kit("run", str(write_tiny(tmp_path, sweep)), *ONE_THREAD, "--launcher", "pool", "--jobs", "2",
                 "--out", str(tmp_path / "runs"))
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 1 of 2 unit(s) did not finish: lr-1e-30-A-12 (failed: ") \
        and "non-finite loss" in message
    states = {u["unit"]: (u["state"], u["detail"]) for u in status(run_dir_under(tmp_path / "runs"))["units"]}
    failed = {unit for unit, (state, _) in states.items() if state == "failed"}
    assert failed == {"lr-1e-30-A-12"}
    assert all("non-finite loss" in states[unit][1] for unit in failed)
    assert {state for unit, (state, _) in states.items() if unit not in failed} == {"finished"}


@pytest.mark.slow
def test_a_ddp_unit_runs_under_torchrun_inside_its_pool_job(tmp_path: Path) -> None:
    one_unit = TINY.replace("samples = [12, 24]", "samples = [12]").split('[[models]]\nlabel = "B"')[0]
    result = kit("run", str(write_tiny(tmp_path, one_unit)), "--set", 'runner.name="ddp"', "--launcher", "pool",
                 "--jobs", "1", "--set", "launcher.ranks_per_unit=2", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    log = (run_dir_under(tmp_path / "runs") / "units" / "A-12" / "job.log").read_text()
    assert "ddp rank 0/2" in log and "ddp rank 1/2" in log  # each rank's closing line
    assert status(run_dir_under(tmp_path / "runs"))["counts"] == {"finished": 1}


@pytest.mark.slow
def test_sigterm_to_a_pool_run_stops_its_jobs_and_releases_their_claims(tmp_path: Path) -> None:
    two_long = LONG.replace("samples = [200]", "samples = [200, 210]")
    coordinator = subprocess.Popen([sys.executable, "-m", "newllm_kit", "run", str(write_tiny(tmp_path, two_long)),
                                    *ONE_THREAD, "--launcher", "pool", "--jobs", "2", "--out", str(tmp_path / "runs")],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: bool(list((tmp_path / "runs").glob("tiny/*/units/*/claim.json"))), 120, "a claimed unit")
    run_dir = run_dir_under(tmp_path / "runs")
    _wait_for(lambda: len(list(run_dir.glob("units/*/claim.json"))) == 2, 120, "both units claimed")
    coordinator.send_signal(signal.SIGTERM)
    _, err = coordinator.communicate(timeout=120)
    assert coordinator.returncode == 130, err
    assert "interrupted (SIGTERM)" in err.strip().splitlines()[-1]
    assert _children(run_dir) == []  # no job left running
    assert not list(run_dir.glob("units/*/claim.json"))  # each released its claim
    assert {u["state"] for u in status(run_dir)["units"]} == {"pending"}


def _children(run_dir: Path) -> list[int]:
    """The pids of the unit jobs of `run_dir` now running."""
    found = subprocess.run(["pgrep", "-f", f"newllm_kit run {run_dir} --unit"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.slow
def test_kill_9_of_random_workers_20_times_loses_and_repeats_nothing(tmp_path: Path,
                                                                    sequential: list[dict[str, Any]]) -> None:
    rng = random.Random(0)
    kills, starts = 0, 0
    target: list[str] = ["run", str(write_tiny(tmp_path)), *ONE_THREAD, "--out", str(tmp_path / "runs")]
    while True:
        coordinator = subprocess.Popen([sys.executable, "-m", "newllm_kit", *target, "--launcher", "pool",
                                        "--jobs", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        starts += 1
        while coordinator.poll() is None:
            time.sleep(rng.uniform(0.3, 1.5))  # in a job's start, its Phase 1, its Phase 2
            found = [p for p in (tmp_path / "runs").glob("*/*") if (p / "config.resolved.toml").is_file()]
            pids = _children(found[0]) if found and kills < 20 else []
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
        _, err = coordinator.communicate()
        run_dir = run_dir_under(tmp_path / "runs")
        target = ["run", str(run_dir)]
        if coordinator.returncode == 0:
            break
        assert coordinator.returncode == 1, err  # units killed: the grid did not finish, and says so
        assert starts < 60
    assert kills == 20
    document = status(run_dir)
    assert document["counts"] == {"finished": 4}
    assert numbers(run_dir) == sequential  # resumed from checkpoints: the uninterrupted run's numbers
    assert not (run_dir / "results.orphans.jsonl").exists()
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 4


# -- requeue through submitit ---------------------------------------------------------------------------

def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _in_phase2(run_dir: Path, unit: str, epochs: int = 3) -> bool:
    """The unit's job has logged (and so checkpointed) `epochs` Phase-2 epochs."""
    try:
        lines = (run_dir / "units" / unit / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return sum('"phase": "phase2"' in line or '"phase":"phase2"' in line for line in lines) >= epochs


@pytest.mark.slow
def test_a_timed_out_local_job_is_requeued_and_resumes_its_unit(tmp_path: Path,
                                                                long_reference: list[dict[str, Any]]) -> None:
    submitit = pytest.importorskip("submitit")
    from newllm_kit_plugins.launchers.slurm import UnitTask

    run_dir = new_run_dir(tmp_path, LONG, ["runner.threads=1"])
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    # A 1-minute limit: the USR2 sent below is a time-out to submitit, which requeues the task once
    # its checkpoint() has stopped the unit.
    executor.update_parameters(timeout_min=1, signal_delay_s=1)
    job = executor.submit(UnitTask("A-200", ["run", str(run_dir), "--unit", "A-200", "--progress", "plain"], False,
                                   1))
    _wait_for(lambda: _in_phase2(run_dir, "A-200"), 300, "3 Phase-2 epochs of the first attempt")
    (unit_pid,) = _children(run_dir)
    task_pid = int(Path(f"/proc/{unit_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    os.kill(task_pid, signal.SIGUSR2)  # what the controller sends signal_delay_s before the limit
    _wait_for(lambda: (run_dir / "units" / "A-200" / "record.json").exists(), 300, "the requeued job to finish")
    _wait_for(job.done, 60, "the job to end")
    logs = job.stdout() + job.stderr()
    assert "Requeued job" in logs
    assert "resumed from checkpoint (phase 2)" in logs
    assert numbers(run_dir) == long_reference


# -- a real one-node Slurm cluster ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm() -> None:
    reason = start_cluster()
    if reason is not None:
        pytest.skip(f"no Slurm cluster: {reason}")


@pytest.mark.slow
def test_a_grid_on_slurm_gives_the_sequential_numbers(tmp_path: Path, slurm: None,
                                                      sequential: list[dict[str, Any]]) -> None:
    result = kit("run", str(write_tiny(tmp_path)), *ONE_THREAD, "--launcher", "slurm", "--set",
                 "launcher.slurm.time=10", "--set", "launcher.slurm.array_limit=3", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_under(tmp_path / "runs")
    assert numbers(run_dir) == sequential
    assert re.search(r"4 unit\(s\) as Slurm job array\(s\) \d+, \d+", result.stderr)  # 3 + 1 tasks


def test_a_job_array_sbatch_refuses_is_one_line(tmp_path: Path, slurm: None) -> None:
    result = kit("run", str(write_tiny(tmp_path)), "--launcher", "slurm", "--set", 'launcher.slurm.partition="nope"',
                 "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: launcher "slurm": sbatch refused the job array (')
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_detached_slurm_grid_survives_preemption_and_status_follows_it(
        tmp_path: Path, slurm: None, long_reference: list[dict[str, Any]]) -> None:
    """Submit and exit; preempt the running job (USR2, as Slurm does before a time limit): submitit
    requeues it, and the unit resumes from its checkpoint to the uninterrupted run's numbers."""
    result = kit("run", str(write_tiny(tmp_path, LONG)), *ONE_THREAD, "--launcher", "slurm", "--detach",
                 "--set", "launcher.slurm.time=10", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "follow with: newllm-kit status" in result.stdout
    run_dir = run_dir_under(tmp_path / "runs")
    _wait_for(lambda: _in_phase2(run_dir, "A-200"), 300, "3 Phase-2 epochs of the job")
    running = status(run_dir)["units"][0]
    assert running["state"] == "running" and "job " in running["detail"] and "phase phase2" in running["detail"]
    job = json.loads((run_dir / "units" / "A-200" / "claim.json").read_text())["job"]
    subprocess.run(["scancel", "--signal=USR2", job.split("_")[0]], check=True)
    _wait_for(lambda: status(run_dir)["counts"] == {"finished": 1}, 300, "the requeued job to finish")
    logs = "".join(p.read_text(errors="replace") for p in sorted((run_dir / "jobs").rglob("*_log.*")))
    assert "Requeued job" in logs
    assert "resumed from checkpoint (phase 2)" in logs
    assert numbers(run_dir) == long_reference
