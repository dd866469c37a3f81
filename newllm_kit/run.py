"""`newllm-kit run`: check what can be checked before any data is read, pick or create the run
directory, lock it, then run the units here (the sequential launcher) or hand them to a launcher as
jobs and read back how each went; `--unit ID` is such a job. A run that stops with a user error
before any unit computed anything leaves no run directory behind."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, load_config
from .errors import RunFailed, RunInterrupted, UserError
from .experiment import (
    VARIANTS_DIR,
    UnitBusy,
    failure_line,
    finish_meta,
    meta,
    metric_info,
    plan,
    prepare_corpora,
    publish,
    run_experiment,
    start_run,
    update_meta,
)
from .plugins import Plugins
from .preflight import check_before_data
from .progress import NullProgress, make_progress
from .protocols import LaunchRequest, UnitJob
from .result_records import RECORD, UNITS_DIR
from .resume import check_resume_compatible
from .rundir import LOCK, TRACKER_FILES, RunDir, plain_name
from .status import Watch, unit_statuses
from .unit_checkpoint import share
from .unit_files import write_failure


def _latest_run(out: Path, experiment: str) -> RunDir:
    root = out / experiment
    candidates = sorted(p for p in root.glob("*") if (p / "config.resolved.toml").is_file()) if root.is_dir() else []
    if not candidates:
        raise UserError(f"--resume: no earlier run of {experiment!r} under {root}; run without --resume")
    return RunDir.open(candidates[-1])


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _mark(run: RunDir, status: str, **fields: str) -> None:
    """Record in meta.json how the run ended, where there is one and the disk still takes it."""
    meta = run.read_json("meta.json")
    if isinstance(meta, dict):
        try:
            run.write_json("meta.json", {**meta, "status": status, **fields})
        except UserError:
            pass  # e.g. the disk is full: the error already on its way says so


# What a new run directory holds before its first unit computes anything (its trackers may have started).
UNSTARTED = {"config.resolved.toml", "overrides.txt", "meta.json", LOCK, VARIANTS_DIR, "units", *TRACKER_FILES}


def _discard_unstarted(run: RunDir) -> None:
    """Remove a run directory this process created when it holds only what the start wrote: the run
    never started, and an empty run would only be one more folder for `scaling` to warn about."""
    with suppress(OSError):
        if {p.name for p in run.path.iterdir()} <= UNSTARTED:
            shutil.rmtree(run.path)
            run.path.parent.rmdir()  # the experiment's folder too, when this was its only run (else OSError)


def _config(file: Path, overrides: list[str], out: Path, resume: bool, registry: Any
            ) -> tuple[ExperimentConfig, RunDir | None]:
    """The experiment's config, and the run directory it continues (None for a new run). A run directory
    keeps its config.resolved.toml; overrides may change only where its units run (`[launcher]`)."""
    if file.is_dir():
        existing = RunDir.open(file)
        saved = existing.path / "config.resolved.toml"
        config = load_config(saved, registry, overrides)
        check_resume_compatible(saved, config)
        return config, existing
    config = load_config(file, registry, overrides)
    if resume:
        existing = _latest_run(out, config.schema.experiment.name)
        check_resume_compatible(existing.path / "config.resolved.toml", config)
        return config, existing
    return config, None


def execute(file: Path, overrides: list[str], out: Path, resume: bool, progress_mode: str,
            plugins: Plugins, unit: str | None = None, detach: bool = False) -> dict[str, Any]:
    """`newllm-kit run`: the whole grid by its launcher, or (`unit`) one unit of a run directory as a job."""
    if unit is not None:
        if not file.is_dir():
            raise UserError(f"--unit {unit}: give the run directory, not an experiment file "
                            f"(`newllm-kit run RUN_DIR --unit {unit}`)")
        return _job(file, overrides, out, progress_mode, plugins, unit)
    config, existing = _config(file, overrides, out, resume, plugins.registry)
    check_before_data(config)  # every problem found without data in one message, before a folder exists
    launcher = config.launcher.build()
    if getattr(launcher, "in_process", False):
        if detach:
            raise UserError("--detach: the sequential launcher runs the units in this process; choose "
                            "--launcher slurm to submit and exit")
        return _run_here(config, existing, out, overrides, progress_mode, plugins, None)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError(f"launcher {config.launcher.component.name!r} starts the units' processes itself; run it "
                        f"without torchrun (a ddp unit runs under torchrun inside its job)")
    return _launch(config, existing, out, overrides, progress_mode, plugins, launcher, detach)


def _job(run_dir: Path, overrides: list[str], out: Path, progress_mode: str, plugins: Plugins, unit: str
         ) -> dict[str, Any]:
    """One unit of a run directory, as a launcher's job. A job that fails before its unit could even
    start (its config no longer loads, a plugin is missing on that node) leaves that failure where
    `status` reads it, in the unit's folder the launcher made."""
    try:
        config, existing = _config(run_dir, overrides, out, False, plugins.registry)
        check_before_data(config)
        return _run_here(config, existing, out, [], progress_mode, plugins, unit)
    except (KeyboardInterrupt, RunInterrupted, UnitBusy):
        raise
    except BaseException as error:
        folder = run_dir / UNITS_DIR / unit
        if plain_name(unit) and folder.is_dir() and not (folder / RECORD).exists():
            with suppress(UserError):
                write_failure(RunDir(run_dir), unit, *failure_line(error))
        raise


def _run_here(config: ExperimentConfig, existing: RunDir | None, out: Path, overrides: list[str],
              progress_mode: str, plugins: Plugins, unit: str | None) -> dict[str, Any]:
    """Run the units in this process (every rank of it under torchrun): the whole grid, holding the run
    directory's lock, or one unit (a launcher's job), holding that unit's claim instead."""
    runner = config.runner.build()
    runner.setup()
    mine: RunDir | None = None  # rank 0's
    created = False  # `mine` is new: removed again if the run stops with a user error before it starts
    try:
        if runner.rank == 0:
            mine, created = _open_or_create(config, existing, out, overrides, lock=unit is None)
        path = share(runner, None if mine is None else str(mine.path))
        run = mine or RunDir(Path(path))
        progress = make_progress(progress_mode) if runner.rank == 0 else NullProgress()
        plugin_report = [info.to_json() for info in plugins.infos]
        try:
            records = run_experiment(config, run, runner, progress, plugin_report, only=unit)
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM turned into one (named in its args)
            signal_name = str(error.args[0]) if error.args else "SIGINT"
            if mine is not None and unit is None:
                _mark(mine, "interrupted", signal=signal_name)
            raise RunInterrupted(str(run.path), signal_name, unit) from error
        except BaseException as error:
            if mine is not None and unit is None:
                _mark(mine, "failed", error=str(error) or type(error).__name__)
            raise
        finally:
            progress.close()
        summary = run.read_json("summary.json") if runner.rank == 0 else {}
        return {"experiment": config.schema.experiment.name, "run_dir": str(run.path), "results": records,
                "scaling": (summary or {}).get("scaling", {}), "metrics": metric_info(config), "rank": runner.rank}
    except UserError:
        if mine is not None:
            mine.unlock()
            if created:
                _discard_unstarted(mine)
        raise
    finally:
        if mine is not None:
            mine.unlock()
        runner.teardown()


def _open_or_create(config: ExperimentConfig, existing: RunDir | None, out: Path, overrides: list[str],
                    lock: bool) -> tuple[RunDir, bool]:
    """The run directory, checked for links out of it and (`lock`) locked; a new one gets its config."""
    run = existing or RunDir.create(out, config.schema.experiment.name)
    run.check_links()  # before anything is written or trained
    if lock:
        run.lock(_warn)
    if existing is None:
        run.write_text("config.resolved.toml", config.resolved_toml())
        run.write_text("overrides.txt", "".join(f"{o}\n" for o in overrides))
    return run, existing is None


class _Submitting(NullProgress):
    """A detached launch's progress: its lines on stderr, and no units to follow."""

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class _NoRunner:
    """Where the units of a launched grid run, for meta.json: the coordinator builds no runner."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    def describe(self) -> dict[str, Any]:
        return {"name": self.config.runner.component.name, "launcher": self.config.launcher.component.name}


def _launch(config: ExperimentConfig, existing: RunDir | None, out: Path, overrides: list[str], progress_mode: str,
            plugins: Plugins, launcher: Any, detach: bool) -> dict[str, Any]:
    """Hand every unfinished unit to the launcher as a job, holding the run directory's lock meanwhile
    (no second coordinator); then read how each went from the run directory."""
    run, created = _open_or_create(config, existing, out, overrides, lock=True)
    units = plan(config)
    quiet = progress_mode == "none"
    progress = (NullProgress() if quiet else _Submitting()) if detach else make_progress(progress_mode)
    name = config.launcher.component.name
    try:
        _, done = start_run(config, run, units, progress, meta(config, _NoRunner(config),
                                                               [i.to_json() for i in plugins.infos]))
        pending = [u for u in units if u.key not in done]
        prepare_corpora(config, run, pending)  # tokenised once here, so the jobs only read the cache
        distributed = bool(getattr(config.runner.component.factory, "launched_by_torchrun", False))
        jobs = [UnitJob(u.id, ["run", str(run.path), "--unit", u.id, "--progress", "plain"], distributed)
                for u in pending]
        for job in jobs:  # where each job's failure is written, also one that fails before its unit starts
            run.inside(run.path / UNITS_DIR / job.unit).mkdir(parents=True, exist_ok=True)
        progress.message(f"{run.path}: {len(units) - len(jobs)} of {len(units)} unit(s) finished; launching "
                         f"{len(jobs)} with launcher {name!r}")
        progress.experiment(config.schema.experiment.name, len(jobs))
        with Watch(run, [] if detach else [job.unit for job in jobs], progress):
            note = launcher.launch(LaunchRequest(run.path, jobs, detach, progress.message)) if jobs else None
        if note:
            progress.message(f"launcher {name!r}: {note}")
        if detach and jobs:
            update_meta(run, status="submitted", launcher=name, submitted=note)
            return {"experiment": config.schema.experiment.name, "run_dir": str(run.path), "submitted": note,
                    "rank": 0}
        done = publish(run, config, units, progress.message)
        problems = [f"{s.unit} ({s.state}: {s.detail})" for s in unit_statuses(run, config, units)
                    if s.state != "finished"]
        if problems:
            update_meta(run, status="failed", error=f"{len(problems)} unit(s) did not finish")
            shown = "; ".join(problems[:3]) + (f"; … {len(problems) - 3} more" if len(problems) > 3 else "")
            raise RunFailed(f"{len(problems)} of {len(units)} unit(s) did not finish: {shown}; see "
                            f"`newllm-kit status {run.path}`, and continue with `newllm-kit run {run.path} "
                            f"--launcher {name}`")
        finish_meta(config, run, units, done, meta(config, _NoRunner(config), [i.to_json() for i in plugins.infos]),
                    0, repair=True)
        summary = run.read_json("summary.json") or {}
        return {"experiment": config.schema.experiment.name, "run_dir": str(run.path),
                "results": [done[u.key] for u in units], "scaling": summary.get("scaling", {}),
                "metrics": metric_info(config), "rank": 0, "launched": note}
    except KeyboardInterrupt as error:
        signal_name = str(error.args[0]) if error.args else "SIGINT"
        _mark(run, "interrupted", signal=signal_name)
        raise RunInterrupted(str(run.path), signal_name) from error
    except UserError:
        run.unlock()
        if created:
            _discard_unstarted(run)
        raise
    finally:
        progress.close()
        run.unlock()
