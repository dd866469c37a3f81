"""The `pool` launcher: the units of a grid as local worker processes, `jobs` at a time.

Each unit is a child process running `newllm-kit run RUN_DIR --unit ID` (under torchrun when the
runner is ddp); a thread pool (concurrent.futures) starts the next unit whenever one ends. On a GPU
machine each running unit owns its GPUs through CUDA_VISIBLE_DEVICES (one unit per GPU by default);
everywhere the cores are split between the running processes (OMP_NUM_THREADS). A child's output goes
to `units/<id>/job.log`. Ctrl-C or SIGTERM stops the children (each claim is released, each unit
keeps its checkpoint) and starts no more.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import suppress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.errors import UserError
from newllm_kit.launch import cpu_count, job_command, slot_environments, visible_gpus
from newllm_kit.protocols import LaunchRequest, UnitJob
from newllm_kit.rundir import RunDir

STOP_GRACE_S = 60.0  # how long a stopped child may take to release its claim before it is killed


class PoolSettings(BaseModel):
    """The `[launcher]` keys of `pool` (`--jobs N` sets `jobs`)."""

    model_config = ConfigDict(extra="forbid")

    jobs: int | None = Field(None, ge=1, le=4096, description="Units run at once (default: one per GPU, else one "
                             "per core).")
    ranks_per_unit: int = Field(1, ge=1, le=64, description="Processes of a unit whose runner is ddp "
                                "(torchrun --nproc_per_node), each with a GPU of its own.")


class PoolLauncher:
    in_process = False

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self._children: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def launch(self, request: LaunchRequest) -> str | None:
        if request.detach:
            raise UserError("--detach: the pool launcher's jobs are children of this process and end with it; "
                            "keep it running (e.g. under nohup or tmux), or submit with --launcher slurm")
        gpus, cores = visible_gpus(), cpu_count()
        ranks = self.settings.ranks_per_unit if any(job.distributed for job in request.jobs) else 1
        jobs = self.settings.jobs or (len(gpus) // ranks if gpus else cores) or 1
        if gpus and jobs * ranks > len(gpus):
            raise UserError(f"launcher.jobs = {jobs} units × {ranks} GPU(s) each needs {jobs * ranks} GPUs; this "
                            f"machine shows {len(gpus)}; lower launcher.jobs (--jobs) or launcher.ranks_per_unit")
        jobs = min(jobs, len(request.jobs))
        slots: queue.Queue[dict[str, str]] = queue.Queue()
        for env in slot_environments(jobs, ranks, gpus, cores):
            slots.put(env)
        torchrun = ["--standalone", f"--nproc_per_node={ranks}"]
        run = RunDir(request.run_dir)
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="unit") as pool:
            futures = [pool.submit(self._run_one, job, job_command(job, torchrun), slots, run, request)
                       for job in request.jobs]
            try:
                wait(futures)
            except BaseException:  # Ctrl-C / SIGTERM: stop the children, start nothing more
                self._stop_children()
                raise
        for future in futures:
            future.result()  # a launcher bug (not a unit's failure) surfaces here
        where = f"{len(gpus)} GPU(s)" if gpus else f"{cores} core(s), {max(1, cores // (jobs * ranks))} thread(s) each"
        return f"{len(request.jobs)} unit(s) on {jobs} worker(s) ({where})"

    def _run_one(self, job: UnitJob, argv: list[str], slots: queue.Queue[dict[str, str]], run: RunDir,
                 request: LaunchRequest) -> None:
        env = slots.get()
        try:
            log = run.inside(run.path / "units" / job.unit / "job.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if self._stopping:
                    return
                with open(log, "ab") as out:
                    child = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
                self._children.add(child)
            device = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else ""
            request.say(f"{job.unit}: started (pid {child.pid}{device})")
            code = child.wait()
            with self._lock:
                self._children.discard(child)
            if code != 0:  # a unit that finished is reported from the run directory
                request.say(f"{job.unit}: ended with exit code {code}; its log: {log}")
        finally:
            slots.put(env)

    def _stop_children(self) -> None:
        """SIGTERM every running child's process group (torchrun's ranks included), then SIGKILL what is
        left after the grace period."""
        with self._lock:
            self._stopping = True
            children = list(self._children)
        for child in children:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(child.returncode is None for child in children) and time.monotonic() < deadline:
            time.sleep(0.1)  # each worker thread's wait reaps its child (and holds that child's wait lock)
        for child in children:
            if child.returncode is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)


@hookimpl
def register_launchers(register: Any) -> None:
    register("pool", PoolLauncher, settings=PoolSettings,
             description="local worker processes, `jobs` units at a time (one unit per GPU)")
