"""`newllm-kit run`: pick or create the run directory, set up the runner, run, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig, load_config
from .errors import UserError
from .experiment import check_resume_compatible, run_experiment
from .plugins import Plugins
from .progress import NullProgress, make_progress
from .rundir import RunDir, atomic_write_json, atomic_write_text


def _latest_run(out: Path, experiment: str) -> RunDir:
    root = out / experiment
    candidates = sorted(p for p in root.glob("*") if (p / "config.resolved.toml").is_file()) if root.is_dir() else []
    if not candidates:
        raise UserError(f"--resume: no earlier run of {experiment!r} under {root}; run without --resume")
    return RunDir(candidates[-1])


def _share_path(runner: Any, path: str | None) -> str:
    """Rank 0 names the run directory; the other ranks learn it through the runner."""
    if runner.world_size == 1:
        assert path is not None
        return path
    buffer = torch.zeros(1024, dtype=torch.uint8, device=runner.device)
    if runner.rank == 0:
        encoded = (path or "").encode()
        buffer[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    shared = runner.broadcast(buffer, 0).cpu()
    return bytes(shared[shared != 0].tolist()).decode()


def execute(file: Path, overrides: list[str], out: Path, resume: bool, progress_mode: str,
            plugins: Plugins) -> dict[str, Any]:
    registry = plugins.registry
    existing: RunDir | None = None
    if file.is_dir():
        existing = RunDir.open(file)
        config: ExperimentConfig = load_config(existing.path / "config.resolved.toml", registry, [])
        if overrides:
            check_resume_compatible((existing.path / "config.resolved.toml").read_text(),
                                    load_config(existing.path / "config.resolved.toml", registry, overrides))
    else:
        config = load_config(file, registry, overrides)
        if resume:
            existing = _latest_run(out, config.schema.experiment.name)
            check_resume_compatible((existing.path / "config.resolved.toml").read_text(), config)

    runner = config.runner.build()
    runner.setup()
    try:
        path = None
        if runner.rank == 0:
            if existing is None:
                existing = RunDir.create(out, config.schema.experiment.name)
                atomic_write_text(existing.path / "config.resolved.toml", config.resolved_toml())
                atomic_write_text(existing.path / "overrides.txt", "".join(f"{o}\n" for o in overrides))
            path = str(existing.path)
        run = RunDir(Path(_share_path(runner, path)))
        progress = make_progress(progress_mode) if runner.rank == 0 else NullProgress()
        plugin_report = [info.to_json() for info in plugins.infos]
        try:
            records = run_experiment(config, run, runner, progress, plugin_report)
        except BaseException as error:
            if runner.rank == 0 and (run.path / "meta.json").exists():
                meta = json.loads((run.path / "meta.json").read_text())
                atomic_write_json(run.path / "meta.json", {**meta, "status": "failed", "error": str(error)})
            raise
        finally:
            progress.close()
        summary = json.loads((run.path / "summary.json").read_text()) if runner.rank == 0 else {}
        return {"experiment": config.schema.experiment.name, "run_dir": str(run.path), "results": records,
                "scaling": summary.get("scaling", {}), "rank": runner.rank}
    finally:
        runner.teardown()
