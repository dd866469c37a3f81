"""What every launcher shares: the command line of a unit's job, and how a machine's devices and
cores are divided between the jobs that run on it at once."""

from __future__ import annotations

import os
import sys

from . import cuda
from .protocols import UnitJob


def job_command(job: UnitJob, torchrun: list[str] | None = None) -> list[str]:
    """The command a job runs: `python -m newllm_kit run RUN_DIR --unit ID …` with this interpreter,
    or the same under torchrun (`torchrun` holds its options, e.g. `--standalone --nproc_per_node=2`)
    for a unit whose runner is one process per device."""
    if job.distributed:
        return [sys.executable, "-m", "torch.distributed.run", *(torchrun or ["--standalone", "--nproc_per_node=1"]),
                "-m", "newllm_kit", *job.args]
    return [sys.executable, "-m", "newllm_kit", *job.args]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip() and name.strip() != "-1"]
    gpu = cuda.backend()
    return [str(i) for i in range(gpu.device_count())] if gpu.is_available() else []


def cpu_count() -> int:
    """The cores this process may run on (its affinity, which a container or Slurm sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def slot_environments(jobs: int, ranks: int, gpus: list[str], cores: int) -> list[dict[str, str]]:
    """The environment of each of `jobs` concurrent jobs of `ranks` processes: on a GPU machine each
    job gets `ranks` GPUs of its own (CUDA_VISIBLE_DEVICES), and everywhere the cores are split evenly
    between all processes (OMP_NUM_THREADS, which torch reads at start), at least one each."""
    threads = str(max(1, cores // (jobs * ranks)))
    slots = []
    for slot in range(jobs):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * ranks:(slot + 1) * ranks])
        slots.append(env)
    return slots
