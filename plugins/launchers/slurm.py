"""The `slurm` launcher: the units of a grid as one Slurm job array, submitted through submitit.

Each array task runs `newllm-kit run RUN_DIR --unit ID` as a child process (under torchrun, across
the job's nodes, when the runner is ddp); what travels through submitit's pickle is that command
line and nothing else: the job reads the run directory, which must sit on a filesystem every node
mounts. A grid larger than the cluster's MaxArraySize is submitted as several arrays.

Preemption and time limits: Slurm signals the job (USR2, `signal_delay_s` before the limit);
submitit then calls `UnitTask.checkpoint`, which stops the child (the unit keeps its last checkpoint
and releases its claim) and hands submitit the same task to requeue. The requeued job keeps its id,
takes its unit's claim back at once and resumes from that checkpoint.

Without `--detach` the launcher waits until no task of its arrays is left in `squeue`; how each unit
went is read from the run directory, never from accounting (`sacct` may not exist).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from newllm_kit import hookimpl
from newllm_kit.errors import UserError
from newllm_kit.launch import job_command
from newllm_kit.protocols import LaunchRequest, UnitJob

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize
POLL_S = 2.0
STOP_GRACE_S = 60.0
RDZV_PORT = 29500
INSTALL = "pip install 'newllm-kit[slurm]'"


class SlurmKeys(BaseModel):
    """`[launcher.slurm]`: what each unit's job asks Slurm for."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="sbatch --partition")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time: int = Field(24 * 60, ge=1, description="Time limit of one job in minutes (a unit that needs longer "
                      "is requeued from its checkpoint)")
    nodes: int = Field(1, ge=1, le=4096, description="Nodes per unit (more than 1 only for a ddp runner)")
    gpus_per_node: int = Field(0, ge=0, le=64, description="GPUs per node (0: none asked for)")
    ranks_per_node: int | None = Field(None, ge=1, le=64, description="torchrun processes per node of a ddp unit "
                                       "(default: gpus_per_node, at least 1)")
    cpus_per_task: int | None = Field(None, ge=1, le=4096, description="sbatch --cpus-per-task")
    mem: str | None = Field(None, description="sbatch --mem, e.g. \"64G\"")
    extra: list[str] = Field(default_factory=list, description="More sbatch options, e.g. [\"--constraint=a100\"]")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before each job, e.g. module loads")
    array_parallelism: int | None = Field(None, ge=1, description="Tasks of the array running at once")
    signal_delay_s: int = Field(120, ge=10, description="Seconds before the time limit when the job is signalled "
                                "to stop and requeue")
    max_requeues: int = Field(3, ge=0, le=1000, description="Time-outs after which a unit is not requeued again")
    array_limit: int | None = Field(None, ge=1, description="Most tasks per job array (default: the cluster's "
                                    "MaxArraySize)")

    @field_validator("extra")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        for option in value:
            if not re.fullmatch(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", option):
                raise ValueError(f"{option!r} is not an sbatch option of the form --name or --name=value")
        return value


class SlurmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slurm: SlurmKeys = Field(default_factory=lambda: SlurmKeys())


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError(f"launcher \"slurm\" needs submitit: {INSTALL}") from None
    return submitit


class UnitTask:
    """What one array task runs: the unit's command line. Checkpointable the way submitit expects
    (`checkpoint` returns the call to requeue), holding only strings."""

    def __init__(self, unit: str, args: list[str], distributed: bool, ranks_per_node: int) -> None:
        self.unit, self.args, self.distributed, self.ranks_per_node = unit, args, distributed, ranks_per_node
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"unit": self.unit, "args": self.args, "distributed": self.distributed,
                "ranks_per_node": self.ranks_per_node}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.unit, self.args, self.distributed = state["unit"], state["args"], state["distributed"]
        self.ranks_per_node, self._child = state["ranks_per_node"], None

    def __call__(self) -> int:
        job = UnitJob(self.unit, self.args, self.distributed)
        self._child = subprocess.Popen(job_command(job, self._torchrun()), stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        code = self._child.wait()
        if code != 0:  # the job's state says so; units/<id>/failed.json says why
            raise RuntimeError(f"unit {self.unit}: newllm-kit exited with code {code}")
        return code

    def _torchrun(self) -> list[str]:
        env = _submitit().JobEnvironment()
        if env.num_nodes == 1:
            return ["--standalone", f"--nproc_per_node={self.ranks_per_node}"]
        return [f"--nnodes={env.num_nodes}", f"--node_rank={env.node}", f"--nproc_per_node={self.ranks_per_node}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint={env.hostnames[0]}:{RDZV_PORT}", f"--rdzv_id={env.job_id}"]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Preempted or out of time: stop the unit (it releases its claim; its checkpoint stays) and
        requeue this same task."""
        if self._child is not None:
            _stop(self._child.pid)
        return _submitit().helpers.DelayedSubmission(UnitTask(self.unit, self.args, self.distributed,
                                                              self.ranks_per_node))


def _stop(pid: int) -> None:
    """SIGTERM the child's process group and reap it, SIGKILL after the grace period. Runs inside the
    signal handler that interrupted `Popen.wait` on the same child, whose lock that wait still holds:
    so `os.waitpid`, not `Popen.wait` (the interrupted wait then finds the child reaped)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] != 0:
                return
        except ChildProcessError:  # reaped already
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def max_array_size() -> int:
    """The cluster's MaxArraySize (an array holds at most that many tasks), Slurm's default if unknown."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", shown, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY_SIZE


def _alive(job_ids: list[str]) -> set[str] | None:
    """The array job ids still in the queue (pending, running or requeued); None when squeue failed."""
    try:
        result = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(job_ids)], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return set() if "Invalid job id" in result.stderr else None  # all of them left the queue
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}


class SlurmLauncher:
    in_process = False

    def __init__(self, settings: SlurmSettings | None = None) -> None:
        self.keys = (settings or SlurmSettings()).slurm

    def _executor(self, folder: Path, name: str) -> Any:
        keys = self.keys
        executor = _submitit().SlurmExecutor(folder=folder / "%j", max_num_timeout=keys.max_requeues)
        extra: dict[str, Any] = {}
        for option in keys.extra:  # --name=value, or a bare --name
            name, _, value = option[2:].partition("=")
            extra[name] = value if "=" in option else True
        parameters: dict[str, Any] = {
            "job_name": name, "time": keys.time, "nodes": keys.nodes, "ntasks_per_node": 1,
            "signal_delay_s": keys.signal_delay_s, "partition": keys.partition, "account": keys.account,
            "qos": keys.qos, "cpus_per_task": keys.cpus_per_task, "mem": keys.mem,
            "gpus_per_node": keys.gpus_per_node or None, "setup": keys.setup or None,
            "additional_parameters": extra or None,
        }
        if keys.array_parallelism is not None:
            parameters["array_parallelism"] = keys.array_parallelism
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        return executor

    def launch(self, request: LaunchRequest) -> str | None:
        if self.keys.nodes > 1 and not any(job.distributed for job in request.jobs):
            raise UserError(f"launcher.slurm.nodes = {self.keys.nodes}: more than one node per unit needs the ddp "
                            f"runner ([runner] name = \"ddp\"); set nodes = 1")
        ranks = self.keys.ranks_per_node or max(1, self.keys.gpus_per_node)
        tasks = [UnitTask(job.unit, job.args, job.distributed, ranks) for job in request.jobs]
        executor = self._executor(request.run_dir / "jobs", f"newllm-{request.run_dir.parent.name}")
        size = min(self.keys.array_limit or sys.maxsize, max_array_size())
        arrays: list[str] = []
        try:
            for start in range(0, len(tasks), size):
                with executor.batch():
                    submitted = [executor.submit(task) for task in tasks[start:start + size]]
                arrays.append(str(submitted[0].job_id).split("_")[0])
        except Exception as error:  # sbatch refused: a bad partition, account, limit …
            text = " ".join(str(error).split())
            raise UserError(f"launcher \"slurm\": sbatch refused the job array ({text[:300]}); check the "
                            f"[launcher.slurm] keys") from None
        note = f"{len(tasks)} unit(s) as Slurm job array(s) {', '.join(arrays)} (logs in {request.run_dir / 'jobs'})"
        if not request.detach:
            self._wait(arrays, request)
        return note

    def _wait(self, arrays: list[str], request: LaunchRequest) -> None:
        """Until no task of `arrays` is queued or running; Ctrl-C cancels them (scancel) first."""
        try:
            while True:
                alive = _alive(arrays)
                if alive is not None and not alive & set(arrays):
                    return
                time.sleep(POLL_S)
        except BaseException:
            subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)  # SIGTERM, then SIGKILL
            raise


@hookimpl
def register_launchers(register: Any) -> None:
    register("slurm", SlurmLauncher, settings=SlurmSettings,
             description="a Slurm job array through submitit; jobs requeue after preemption or time-out")
