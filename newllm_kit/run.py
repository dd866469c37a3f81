"""`newllm-kit run`: check what can be checked before any data is read, pick or create the run
directory, lock it, set up the runner, run, report. A run that stops with a user error before any unit
computed anything leaves no run directory behind."""

from __future__ import annotations

import shutil
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, load_config
from .errors import RunInterrupted, UserError
from .experiment import VARIANTS_DIR, metric_info, run_experiment
from .plugins import Plugins
from .preflight import check_before_data
from .progress import NullProgress, make_progress
from .resume import check_resume_compatible
from .rundir import LOCK, RunDir
from .unit_checkpoint import share


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


# What a new run directory holds before its first unit computes anything.
UNSTARTED = {"config.resolved.toml", "overrides.txt", "meta.json", LOCK, VARIANTS_DIR}


def _discard_unstarted(run: RunDir) -> None:
    """Remove a run directory this process created when it holds only what the start wrote: the run
    never started, and an empty run would only be one more folder for `scaling` to warn about."""
    with suppress(OSError):
        if {p.name for p in run.path.iterdir()} <= UNSTARTED:
            shutil.rmtree(run.path)
            run.path.parent.rmdir()  # the experiment's folder too, when this was its only run (else OSError)


def execute(file: Path, overrides: list[str], out: Path, resume: bool, progress_mode: str,
            plugins: Plugins) -> dict[str, Any]:
    registry = plugins.registry
    existing: RunDir | None = None
    if file.is_dir():
        existing = RunDir.open(file)
        saved = existing.path / "config.resolved.toml"
        config: ExperimentConfig = load_config(saved, registry, [])
        check_resume_compatible(saved, load_config(saved, registry, overrides) if overrides else config)
    else:
        config = load_config(file, registry, overrides)
        if resume:
            existing = _latest_run(out, config.schema.experiment.name)
            check_resume_compatible(existing.path / "config.resolved.toml", config)
    check_before_data(config)  # every problem found without data in one message, before a folder exists

    runner = config.runner.build()
    runner.setup()
    mine: RunDir | None = None  # rank 0's, holding the lock
    created = False  # `mine` is new: removed again if the run stops with a user error before it starts
    try:
        if runner.rank == 0:
            mine = existing or RunDir.create(out, config.schema.experiment.name)
            created = existing is None
            mine.check_links()  # before anything is written or trained
            mine.lock(_warn)
            if existing is None:
                mine.write_text("config.resolved.toml", config.resolved_toml())
                mine.write_text("overrides.txt", "".join(f"{o}\n" for o in overrides))
        path = share(runner, None if mine is None else str(mine.path))
        run = mine or RunDir(Path(path))
        progress = make_progress(progress_mode) if runner.rank == 0 else NullProgress()
        plugin_report = [info.to_json() for info in plugins.infos]
        try:
            records = run_experiment(config, run, runner, progress, plugin_report)
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM turned into one (named in its args)
            signal_name = str(error.args[0]) if error.args else "SIGINT"
            if mine is not None:
                _mark(mine, "interrupted", signal=signal_name)
            raise RunInterrupted(str(run.path), signal_name) from error
        except BaseException as error:
            if mine is not None:
                _mark(mine, "failed", error=str(error) or type(error).__name__)
            raise
        finally:
            progress.close()
        summary = run.read_json("summary.json") if runner.rank == 0 else {}
        return {"experiment": config.schema.experiment.name, "run_dir": str(run.path), "results": records,
                "scaling": summary.get("scaling", {}), "metrics": metric_info(config), "rank": runner.rank}
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
