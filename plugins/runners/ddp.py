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

Every collective is timed on each rank, per phase (the `memory_phase` block it runs in, `other`
outside any), and at teardown each rank reports one line on stderr (through the `newllm_kit` logger
instead when INFO reaches a handler), `ddp rank r/W: peak RSS …; total … s; phase1 … s (collectives
…, waiting … s, longest … s); …`, so an unbalanced phase shows as one rank waiting.
`DDPRunner.timings()` returns the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from newllm_kit import cuda, hookimpl
from newllm_kit.errors import RunFailed, UserError

from .local import CPURunner, GPURunner, RunnerSettings

log = logging.getLogger("newllm_kit")

LAUNCH = "torchrun --nproc_per_node=K -m newllm_kit run FILE"
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
OUTSIDE = "other"  # the phase of collectives run outside any memory_phase block


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


def _read_local_world_size(env: dict[str, str]) -> int:
    """LOCAL_WORLD_SIZE (processes on this node, set by torchrun); 1 when absent."""
    value = env.get("LOCAL_WORLD_SIZE", "").strip()
    if not value:
        return 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"LOCAL_WORLD_SIZE must be an integer ≥ 1, got {value!r}; start with `{LAUNCH}`")
    return count


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux, else ru_maxrss.

    A child's ru_maxrss starts at its parent's peak (Linux carries it over at exec), so a torchrun
    worker would report at least torchrun's own footprint; VmHWM is the worker's alone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


@dataclass
class PhaseTime:
    """One phase on one rank: wall seconds inside its blocks, and the collectives run there."""

    seconds: float = 0.0
    collectives: int = 0
    waiting_s: float = 0.0
    longest_s: float = 0.0


class RankTimings:
    """Per-phase wall time and collective waits of one rank.

    `phase(name)` blocks may nest; a collective counts towards the innermost one (`other` outside
    any), a phase's seconds include its inner blocks, and re-entering a phase already open is not
    counted twice. `other`'s seconds are the total less the outermost blocks.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.started = clock()
        self.phases: dict[str, PhaseTime] = {}
        self._open: list[str] = []
        self._outermost_s = 0.0

    def _entry(self, name: str) -> PhaseTime:
        return self.phases.setdefault(name, PhaseTime())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        counted, outermost = name not in self._open, not self._open
        self._entry(name)
        self._open.append(name)
        started = self.clock()
        try:
            yield
        finally:
            self._open.pop()
            elapsed = self.clock() - started
            if counted:
                self.phases[name].seconds += elapsed
            if outermost:
                self._outermost_s += elapsed

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Time one collective (its wall time: on CUDA, NCCL returns once the work is queued)."""
        started = self.clock()
        try:
            yield
        finally:
            waited = self.clock() - started
            entry = self._entry(self._open[-1] if self._open else OUTSIDE)
            entry.collectives += 1
            entry.waiting_s += waited
            entry.longest_s = max(entry.longest_s, waited)

    def summary(self) -> dict[str, Any]:
        """{"total_s", "phases": {name: {seconds, collectives, waiting_s, longest_s}}}, phases in the order
        first seen, `other` last."""
        total = self.clock() - self.started
        phases = {name: asdict(entry) for name, entry in self.phases.items() if name != OUTSIDE}
        other = asdict(self.phases.get(OUTSIDE, PhaseTime()))
        other["seconds"] = max(total - self._outermost_s, 0.0)
        return {"total_s": total, "phases": {**phases, OUTSIDE: other}}


def timings_line(rank: int, world_size: int, peak_rss: int, summary: dict[str, Any]) -> str:
    """`ddp rank 1/2: peak RSS 812.4 MiB; total 80.0 s; phase1 41.2 s (collectives 1,204, waiting 3.10 s,
    longest 0.40 s); …` (what benchmarks/rehearsal.py parses)."""
    parts = [f"ddp rank {rank}/{world_size}: peak RSS {peak_rss / 2**20:.1f} MiB", f"total {summary['total_s']:.1f} s"]
    for name, entry in summary["phases"].items():
        parts.append(f"{name} {entry['seconds']:.1f} s (collectives {entry['collectives']:,}, waiting "
                     f"{entry['waiting_s']:.2f} s, longest {entry['longest_s']:.2f} s)")
    return "; ".join(parts)


LINE = re.compile(r"ddp rank (?P<rank>\d+)/(?P<world>\d+): peak RSS (?P<rss>[\d.,]+) MiB; total (?P<total>[\d.]+) s"
                  r"(?P<phases>(?:; .*)?)$")
PHASE = re.compile(r"(?P<name>\S+) (?P<seconds>[\d.]+) s \(collectives (?P<count>[\d,]+), waiting "
                   r"(?P<waiting>[\d.]+) s, longest (?P<longest>[\d.]+) s\)")


def parse_timings_line(text: str) -> dict[str, Any] | None:
    """`timings_line`'s numbers back from one line of output (anything before `ddp rank` is ignored,
    e.g. a launcher's prefix); None when the line is not one."""
    found = LINE.search(text.rstrip())
    if found is None:
        return None
    phases = {}
    for part in found["phases"].split("; ")[1:]:
        entry = PHASE.fullmatch(part)
        if entry is None:
            return None
        phases[entry["name"]] = {"seconds": float(entry["seconds"]),
                                 "collectives": int(entry["count"].replace(",", "")),
                                 "waiting_s": float(entry["waiting"]), "longest_s": float(entry["longest"])}
    return {"rank": int(found["rank"]), "world_size": int(found["world"]),
            "peak_rss_bytes": round(float(found["rss"].replace(",", "")) * 2**20), "total_s": float(found["total"]),
            "phases": phases}


class DDPRunner:
    """A process group over torchrun's workers; rank 0 (`is_main`) writes the run directory."""

    name = "ddp"
    launched_by_torchrun = True  # a launcher starts a unit of this runner under torchrun

    def __init__(self, settings: RunnerSettings | None = None, env: dict[str, str] | None = None) -> None:
        self.settings = settings or RunnerSettings()
        environ = dict(os.environ) if env is None else env
        self.rank, self.world_size, self.local_rank = _read_env(environ)
        self.local_world_size = _read_local_world_size(environ)
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
        self._timings = RankTimings()
        self._reported = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Join the group; the timeout bounds every collective, so a dead rank fails the job."""
        self._timings, self._reported = RankTimings(), False
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
        """Report this rank's timings (once), then leave the group."""
        if not self._reported:
            self._reported = True
            self._report()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
        self.local.teardown()

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """One timed collective; a dead peer, or a wait past runner.timeout_s, ends the run in one line."""
        try:
            with self._timings.collective():
                yield
        except (dist.DistError, RuntimeError) as error:
            text = " ".join(str(error).split())
            if not isinstance(error, dist.DistError) and not any(
                    sign in text.lower() for sign in ("timed out", "timeout", "connection", "peer")):
                raise
            raise RunFailed(f"ddp rank {self.rank}: a collective failed ({text[:160]}): another rank died or did "
                            f"not reach it within runner.timeout_s = {self.settings.timeout_s:g} s; see the other "
                            f"ranks' messages, or raise runner.timeout_s") from error

    def timings(self) -> dict[str, Any]:
        """This rank's peak RSS (bytes) and, per phase, its wall seconds and collective waits (`RankTimings`)."""
        return {"rank": self.rank, "world_size": self.world_size, "local_world_size": self.local_world_size,
                "peak_rss_bytes": peak_rss_bytes(), **self._timings.summary()}

    def _report(self) -> None:
        """One plain line per rank. The CLI configures no logging handler, so unless INFO reaches one
        it goes straight to stderr, where torchrun passes it through (benchmarks/rehearsal.py reads it)."""
        timings = self.timings()
        line = timings_line(self.rank, self.world_size, timings["peak_rss_bytes"], timings)
        if log.isEnabledFor(logging.INFO) and log.hasHandlers():
            log.info(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def autocast(self) -> AbstractContextManager[Any]:
        return self.local.autocast()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        """The local rule, then the smallest over ranks, so all take the same steps (a collective: call
        it on every rank)."""
        batch = torch.tensor([self.local.batch_size(requested, bytes_per_item)], device=self.device)
        with self._collective():
            dist.all_reduce(batch, op=dist.ReduceOp.MIN)
        return int(batch.item())

    def start_unit(self, unit: str) -> None:
        self.local.start_unit(unit)

    @contextlib.contextmanager
    def memory_phase(self, phase: str) -> Iterator[None]:
        """The local runner's phase (its micro-batch cap), timed: collectives inside count towards `phase`."""
        with self._timings.phase(phase), self.local.memory_phase(phase):
            yield

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
        with self._collective():
            dist.all_gather(rows, row)
        return rows[(self.rank - 1) % self.world_size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the same tensor."""
        with self._collective():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s values into `tensor` on every rank, in place."""
        with self._collective():
            dist.broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        with self._collective():
            dist.barrier()

    def describe(self) -> dict[str, Any]:
        return {**self.local.describe(), "name": self.name, "resolved": self.local.resolved,
                "backend": self.backend, "rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "local_world_size": self.local_world_size,
                "timeout_s": self.settings.timeout_s}


@hookimpl
def register_runners(register: Any) -> None:
    register("ddp", DDPRunner, settings=RunnerSettings,
             description=f"data-parallel over torchrun processes (NCCL on GPUs, gloo on CPU): {LAUNCH}")
