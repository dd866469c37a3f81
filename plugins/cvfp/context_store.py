"""Where Phase 2's contexts live: one [n, C] store per stream, on the device, in host memory or on disk.

Phase 2 keeps only the final-layer context of every position and recomputes the per-layer ones per
batch, yet at 5M tokens even that is 15 GB for v2 A in fp32: more than a 24 GB card spares next to
Phase 2. `runner.context_store` (a member of `newllm_kit.protocols.MemoryPolicy`) says where the stores go:

* ``device``: runner.device memory; nothing moves per batch.
* ``host``: CPU memory, pinned on a CUDA runner so each batch's rows copy asynchronously.
* ``disk``: a memory-mapped file in the run directory, for streams beyond RAM; the OS pages it in.
* ``auto``: device when the unit's stores fit in `memory_fraction` of the device's free memory, else
  host when they fit in that share of the available RAM, else disk.

On a CPU runner device and host are the same memory. `runner.context_dtype = "bf16"` halves every
store; it applies to these stores only (Phase 1 keeps fp32 targets). Free device memory is asked of the
core's CUDA backend (`newllm_kit.cuda`), so tests can fake a GPU.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm_kit import cuda
from newllm_kit.errors import RunFailed, UserError
from newllm_kit.params import available_bytes, human_bytes
from newllm_kit.protocols import Collectives, MemoryPolicy, Placement, Runner, member

KINDS = ("device", "host", "disk")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILE_TYPES = {"fp32": np.float32, "bf16": np.uint16}  # numpy has no bfloat16: the same 2 bytes, viewed


@dataclass(frozen=True)
class StorePlan:
    """Where a unit's stores go and why; `bytes` covers all of this rank's stores together, as
    allocated (pinned host blocks rounded up to powers of two), and `host_ranks` ranks of the job
    share this host, each with its own stores."""

    kind: str
    dtype: str
    bytes: int
    reason: str
    host_ranks: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "bytes": self.bytes, "host_ranks": self.host_ranks}

    def describe(self) -> str:
        size = human_bytes(self.bytes) if self.host_ranks == 1 else (
            f"{human_bytes(self.bytes)} per rank, {human_bytes(self.bytes * self.host_ranks)} for the "
            f"{self.host_ranks} ranks on this host")
        return f"context stores on {self.kind} ({self.dtype}, {size}): {self.reason}"

    def advice(self) -> str:
        """The settings that lower the memory (or disk) these stores take; empty when none is left."""
        moves = {"device": 'runner.context_store = "host" or "disk"', "host": 'runner.context_store = "disk"'}
        settings = [moves.get(self.kind, ""), 'runner.context_dtype = "bf16"' if self.dtype == "fp32" else ""]
        return " or ".join(s for s in settings if s)

    def fix(self, first: str) -> str:
        """`first`, then the store's own advice: what an out-of-memory message tells to set."""
        return f"{first}, or {self.advice()}" if self.advice() else first


def pinned_bytes(size: int) -> int:
    """What PyTorch's caching host allocator takes for a pinned block of `size` bytes: it rounds every
    block up to a power of two (a 15.4 GB store pins 16 GiB)."""
    return 1 << (size - 1).bit_length() if size > 0 else 0


def settings_of(runner: MemoryPolicy) -> tuple[str, str, float]:
    """(context_store, context_dtype, memory_fraction): the runner's store policy, with `MemoryPolicy`'s
    defaults for a plugin runner that leaves these members out."""
    return (str(member(runner, MemoryPolicy, "context_store")), str(member(runner, MemoryPolicy, "context_dtype")),
            float(member(runner, MemoryPolicy, "memory_fraction")))


def free_bytes(device: torch.device) -> int | None:
    """What a new allocation on `device` can get: on CUDA the driver's free memory plus the blocks
    PyTorch has cached but not handed out (Phase 1 leaves many), elsewhere the available RAM."""
    if device.type == "cuda":
        gpu = cuda.backend()
        return int(gpu.mem_get_info(device)[0] + gpu.memory_reserved(device) - gpu.memory_allocated(device))
    return available_bytes(device)


def disk_free(folder: Path) -> int:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def decide(needed: int, fraction: float, device_free: int | None, host_free: int | None,
           on_gpu: bool, host_needed: int | None = None) -> tuple[str, str]:
    """(kind, why) for `auto`: device, else host, else disk; None means unknown, taken as room enough.
    `host_needed` is what the stores take in host memory when it differs (pinned rounding)."""
    def fits(free: int | None, size: int = needed) -> bool:
        return free is None or size <= fraction * free

    def share(free: int | None, where: str) -> str:
        return f"{fraction:g} × {human_bytes(free)} free {where}" if free is not None else f"unknown free {where}"

    if on_gpu and fits(device_free):
        return "device", f"fits in {share(device_free, 'on the device')}"
    if fits(host_free, needed if host_needed is None else host_needed):
        kind = "host" if on_gpu else "device"
        return kind, f"fits in {share(host_free, 'in RAM')}" + (
            f", not in {share(device_free, 'on the device')}" if on_gpu else "")
    beyond = f"{share(device_free, 'on the device')} and " if on_gpu else ""
    return "disk", f"exceeds {beyond}{share(host_free, 'in RAM')}"


def _agree(kind: str, runner: Collectives) -> str:
    """The most conservative kind any rank chose, so every rank records (and holds) the same."""
    if runner.world_size == 1:
        return kind
    votes = torch.zeros(len(KINDS), device=runner.device)
    votes[KINDS.index(kind)] = 1
    chosen = runner.all_reduce_sum(votes).nonzero().max().item()
    return KINDS[int(chosen)]


def plan_stores(runner: Runner, rows: int | dict[str, int], width: int, folder: Path) -> StorePlan:
    """Where this rank's stores of `rows` contexts of `width` go (a count, or rows by store), checked
    against its share of the free memory or disk of that place: the ranks on one host
    (`local_world_size`) split its RAM and disk, and pinned host stores are counted as the allocator
    rounds them. A store that cannot fit fails here, in one line, before allocating (a UserError:
    exit 2, like any full disk)."""
    requested, dtype, fraction = settings_of(runner)
    sizes = rows if isinstance(rows, dict) else {"stores": rows}
    raw = [r * width * DTYPES[dtype].itemsize for r in sizes.values()]
    device = runner.device
    on_gpu = device.type == "cuda"
    ranks = max(int(member(runner, MemoryPolicy, "local_world_size")), 1)
    host_free = _share(available_bytes(torch.device("cpu")), ranks)
    pinned = sum(pinned_bytes(size) for size in raw) if on_gpu else sum(raw)
    if requested == "auto":
        kind, reason = decide(sum(raw), fraction, free_bytes(device) if on_gpu else None, host_free, on_gpu, pinned)
        kind = _agree(kind, runner)
    else:
        kind, reason = requested, "runner.context_store"
    needed = pinned if kind == "host" else sum(raw)
    plan = StorePlan(kind, dtype, needed, reason, ranks)
    free = {"device": free_bytes(device), "host": host_free, "disk": _share(disk_free(folder), ranks)}[kind]
    if free is not None and needed > free:  # a setting or free space fixes it, as README's exit 2 says
        where = f"{device} memory" if kind == "device" else "RAM" if kind == "host" else f"the disk at {folder}"
        share = f" (its share for each of the {ranks} ranks on this host)" if ranks > 1 and kind != "device" else ""
        fixes = ["free disk space"] * (kind == "disk") + [f"set {plan.advice()}"] * bool(plan.advice())
        raise UserError(f"allocating the context stores: they need {needed:,} bytes ({human_bytes(needed)}) but "
                        f"{where} has {human_bytes(free)} free{share}; {' or '.join(fixes)}")
    return plan


def _share(free: int | None, ranks: int) -> int | None:
    return None if free is None else free // ranks


OUT_OF_MEMORY = ("can't allocate memory",  # the CPU allocator
                 "CUDA error: out of memory")  # a failed cudaHostAlloc: a pinned host store or copy


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, the CPU allocator's, a failed pinned host allocation, or a runner's
    refusal (UserError) caused by one."""
    cause = error.__cause__ if isinstance(error, UserError) else error
    return isinstance(cause, torch.OutOfMemoryError) or (
        isinstance(cause, RuntimeError) and any(text in str(cause) for text in OUT_OF_MEMORY))


def out_of_memory_message(unit: str, phase: str, error: BaseException, plan: StorePlan, fix: str) -> str:
    """One line: the unit and phase, what ran out (a runner's refusal says it with its batch), the
    bytes the context stores take, and the settings to change."""
    said = str(error) if isinstance(error, UserError) else f"out of memory ({type(error).__name__})"
    return (f"{unit}: {phase}: {said}; the context stores take {plan.bytes:,} bytes ({human_bytes(plan.bytes)}, "
            f"{plan.kind}, {plan.dtype}); set {fix}")


def _pinned(runner: Placement) -> bool:
    return runner.device.type == "cuda" and cuda.backend().is_available()


def allocate(plan: StorePlan, rows: int, width: int, runner: Placement, file: Path | None = None,
             reuse: bool = False) -> torch.Tensor:
    """One [rows, width] store as the plan says; `file` (kind disk) is created or overwritten, or with
    `reuse` opened as it is when it has the store's size (a resumed unit's saved store)."""
    dtype = DTYPES[plan.dtype]
    if plan.kind == "device":
        return torch.empty(rows, width, dtype=dtype, device=runner.device)
    if plan.kind == "host":
        return torch.empty(rows, width, dtype=dtype, pin_memory=_pinned(runner))
    if file is None:
        raise ValueError("a disk store needs a file")
    size = rows * width * dtype.itemsize
    if size == 0:  # a rank that holds none of a stream's rows (more ranks than positions)
        return torch.empty(rows, width, dtype=dtype)
    if not (reuse and file.is_file() and file.stat().st_size == size):
        try:
            with open(file, "wb") as handle:  # reserve the blocks: a full disk fails here, not as SIGBUS mid-solve
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, size)
                else:
                    handle.truncate(size)
        except OSError as error:
            raise UserError(f"{file}: cannot create the disk context store ({error.strerror or error}); free disk "
                            f"space, or set runner.context_store to a memory") from error
    array = np.memmap(file, dtype=FILE_TYPES[plan.dtype], mode="r+", shape=(rows, width))
    return torch.from_numpy(array).view(dtype)


def file_name(unit: str, stream: str, runner: Collectives, dtype: str) -> str:
    """`<unit>-<stream>.<dtype>`, with the rank under ddp (ranks on one host share the run directory)."""
    rank = f".rank{runner.rank}" if runner.world_size > 1 else ""
    return f"{unit}-{stream}{rank}.{dtype}"


@contextmanager
def context_stores(plan: StorePlan, sizes: dict[str, int], width: int, runner: Runner, unit: str,
                   folder: Path, kept: dict[str, Path] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The stores of one unit by stream name; disk files in `folder` are removed when the block ends,
    however it ends (a killed process leaves them to the run's repair on the next start). A disk store
    named in `kept` is that file instead (beside the unit's checkpoint, reused when it is there: the
    saved solve), left for the checkpoint to remove."""
    disk = plan.kind == "disk"
    kept = kept if disk and kept else {}
    files = {name: folder / file_name(unit, name, runner, plan.dtype) for name in sizes if name not in kept} \
        if disk else {}
    try:
        if files:
            folder.mkdir(parents=True, exist_ok=True)
        for file in kept.values():
            file.parent.mkdir(parents=True, exist_ok=True)
        try:
            stores = {name: allocate(plan, rows, width, runner, kept.get(name) or files.get(name),
                                     reuse=name in kept) for name, rows in sizes.items()}
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise RunFailed(out_of_memory_message(unit, "allocating the context stores", error, plan,
                                                  plan.advice() or "free memory")) from error
        yield stores
    finally:
        for file in files.values():
            file.unlink(missing_ok=True)  # a mapping still open keeps its pages until it is dropped
        if files:
            with suppress(OSError):
                folder.rmdir()  # only when empty: another rank's file may still be there
