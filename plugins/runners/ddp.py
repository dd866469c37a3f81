"""The `ddp` runner: one process per device, started by torchrun, joined in a process group.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process; this
runner reads them, puts rank r on cuda:LOCAL_RANK with NCCL (or on the CPU with gloo when there is
no CUDA) and provides the few collectives the solvers need: a contiguous shard of the stream, the
boundary row of the previous shard, sums and broadcasts. Device concerns (precision, batch size,
out-of-memory fallback, where the context stores live) are delegated to the single-device runner of
the same machine.

Every rank holds the whole Phase-2 context store of each stream ([n, C], wherever
`context_store` puts it): a rank trains on its slice of every batch, and those slices span the
stream, so no contiguous part of it would do. A disk store is one file per rank.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from newllm_kit import cuda, hookimpl
from newllm_kit.errors import UserError

from .local import CPURunner, GPURunner, RunnerSettings

LAUNCH = "torchrun --nproc_per_node=K -m newllm_kit run FILE"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def contiguous_shard(n: int, rank: int, world_size: int) -> range:
    """Rank r's slice of n positions: contiguous, sizes differ by at most one (first n % W larger)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _read_env(env: dict[str, str]) -> tuple[int, int, int]:
    missing = [key for key in ENV_KEYS if not env.get(key)]
    if missing:
        raise UserError(f'runner "ddp" needs the torchrun environment ({", ".join(missing)} not set): '
                        f"start with `{LAUNCH}`")
    try:
        rank, world_size, local_rank = (int(env[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers; start with `{LAUNCH}`") from None
    if not 0 <= rank < world_size:
        raise UserError(f"RANK {rank} is outside 0..WORLD_SIZE-1 ({world_size}); start with `{LAUNCH}`")
    return rank, world_size, local_rank


class DDPRunner:
    """A process group over torchrun's workers; rank 0 (`is_main`) writes the run directory."""

    name = "ddp"

    def __init__(self, settings: RunnerSettings | None = None, env: dict[str, str] | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self.rank, self.world_size, self.local_rank = _read_env(dict(os.environ) if env is None else env)
        self.local: CPURunner
        if cuda.backend().is_available():
            self.backend = "nccl"
            self.local = GPURunner(self.settings.model_copy(update={"device_index": self.local_rank}))
        else:
            self.backend = "gloo"
            self.local = CPURunner(self.settings)
        self.device: torch.device = self.local.device
        self.precision: str = self.local.precision
        self.context_store: str = self.local.context_store
        self.context_dtype: str = self.local.context_dtype
        self.memory_fraction: float = self.local.memory_fraction
        self._owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Join the group; the timeout bounds every collective, so a dead rank fails the job."""
        self.local.setup()
        if dist.is_initialized():
            return
        # torch.distributed.nn's functions take group.WORLD as a default argument when imported, and the
        # first optimizer imports it (via torch._dynamo). Imported after the group exists, it would hold
        # the group past teardown, and a gloo worker releasing its last tensors while the interpreter
        # shuts down aborts the process ("terminate called without an active exception", ~5% of runs).
        import torch.distributed.nn  # noqa: F401
        dist.init_process_group(
            backend=self.backend, timeout=timedelta(seconds=self.settings.timeout_s),
            device_id=self.device if self.backend == "nccl" else None)
        self._owns_group = True

    def teardown(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
        self.local.teardown()

    def autocast(self) -> AbstractContextManager[Any]:
        return self.local.autocast()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        """The local rule, then the smallest over ranks, so all take the same steps (a collective: call
        it on every rank)."""
        batch = torch.tensor([self.local.batch_size(requested, bytes_per_item)], device=self.device)
        dist.all_reduce(batch, op=dist.ReduceOp.MIN)
        return int(batch.item())

    def start_unit(self, unit: str) -> None:
        self.local.start_unit(unit)

    def memory_phase(self, phase: str) -> AbstractContextManager[None]:
        return self.local.memory_phase(phase)

    def micro_batch(self, batch: int) -> int:
        return self.local.micro_batch(batch)

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        """Per rank: micro-batches may then differ, so reduce gradients once per step, not per piece."""
        return self.local.handle_oom(error, batch)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.local.to_device(tensor)

    def shard(self, n: int) -> range:
        return contiguous_shard(n, self.rank, self.world_size)

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        """The previous rank's row (rank 0 gets the last rank's).

        An all_gather of the W small boundary rows: one collective that cannot deadlock on
        send/receive ordering, and cheap because each row is a few kilobytes. Every rank must pass
        a row of the same shape (so every rank must own at least one position).
        """
        row = last_row.contiguous()
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return rows[(self.rank - 1) % self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the same tensor."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s values into `tensor` on every rank, in place."""
        dist.broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        return {**self.local.describe(), "name": self.name, "resolved": self.local.resolved,
                "backend": self.backend, "rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "timeout_s": self.settings.timeout_s}


@hookimpl
def register_runners(register: Any) -> None:
    register("ddp", DDPRunner, settings=RunnerSettings,
             description=f"data-parallel over torchrun processes (NCCL on GPUs, gloo on CPU): {LAUNCH}")
