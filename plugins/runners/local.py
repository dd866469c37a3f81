"""Single-process runners: `cpu`, `gpu`, and `auto` (gpu when CUDA is available, else cpu).

Each runner implements the three concerns of `newllm_kit.protocols.Runner` together: placement
(device, precision, autocast), memory policy (batch sizing, the out-of-memory fallback, where the
context stores go) and single-process collectives. Every CUDA call goes through the core's active
backend (`newllm_kit.cuda`), which tests replace with a fake to exercise the GPU logic on a machine
without one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from newllm_kit import cuda, hookimpl
from newllm_kit.errors import UserError

log = logging.getLogger("newllm_kit")

CPU_BATCH = 512  # the seed's automatic batch on CPU (spec §4.3), where speed, not memory, is the limit


class RunnerSettings(BaseModel):
    """The `[runner]` keys, shared by cpu, gpu, auto and ddp; each description says where it applies."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="all: fp32, or bf16 autocast for matmuls.")
    threads: int | None = Field(
        default=None, ge=1, le=1024, description="all: torch CPU threads; None keeps torch's default.")
    device_index: int = Field(default=0, ge=0, le=1023,
                              description="gpu/auto: CUDA device (ddp uses LOCAL_RANK).")
    tf32: bool = Field(default=True, description="gpu/auto/ddp on CUDA: TF32 tensor cores for fp32 matmuls.")
    auto_batch: bool = Field(
        default=False, description="all: on out-of-memory halve the micro-batch (gradients accumulate, "
                                   "same effective batch) instead of stopping with a suggestion.")
    memory_fraction: float = Field(
        default=0.5, gt=0, le=1, description="gpu: share of (total − allocated) memory a batch may use; all: "
                                             "share of free memory an automatic context store may fill.")
    min_batch: int = Field(default=256, ge=1, le=10**9, description="all: smallest automatic batch.")
    max_batch: int = Field(default=16384, ge=1, le=10**9, description="all: largest automatic batch.")
    context_store: Literal["auto", "device", "host", "disk"] = Field(
        default="auto", description="all: where Phase 2 keeps each stream's final-layer contexts: device, host "
                                    "(pinned CPU memory on a GPU), disk (a memory-mapped file in the run "
                                    "directory) or auto (device, else host, else disk, by free memory).")
    context_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32", description="all: dtype of the Phase-2 context stores (Phase 1 stays fp32).")
    timeout_s: float = Field(
        default=1800, gt=0, le=7 * 24 * 3600,
        description="ddp: seconds a collective may wait before the job fails (so a dead rank cannot hang it). "
                    "It must exceed the longest stretch one rank works between two collectives while another "
                    "waits: with work balanced across ranks, one step's skew plus rank 0's checkpoint writes "
                    "(context stores can be GBs at 5M tokens). 30 min, torch.distributed's own default for gloo.")

    @model_validator(mode="after")
    def _batch_range(self) -> RunnerSettings:
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch {self.min_batch} is larger than max_batch {self.max_batch}")
        return self


class CPURunner:
    """One process on the CPU, and the base of the gpu runner: autocast, batch rule, OOM fallback,
    the store policy of `[runner]` and identity collectives.

    bf16 autocast is the main speed lever on a CPU with bf16 GEMMs (about 4× fp32).
    """

    name = "cpu"
    resolved = "cpu"
    rank = 0
    world_size = 1
    local_world_size = 1

    def __init__(self, settings: RunnerSettings | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self.precision: str = self.settings.precision
        self.context_store: str = self.settings.context_store
        self.context_dtype: str = self.settings.context_dtype
        self.memory_fraction: float = self.settings.memory_fraction
        self.device = torch.device("cpu")
        self.oom_events: list[dict[str, Any]] = []
        self._micro_caps: dict[str, int] = {}  # per phase, for the current unit only
        self._phase = "default"
        self._unit: str | None = None
        self._saved_threads: int | None = None

    def setup(self) -> None:
        if self.settings.threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.settings.threads)

    def teardown(self) -> None:
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        """`requested` when given; otherwise the device's estimate clamped to [min_batch, max_batch]."""
        if requested is not None:
            if requested < 1:
                raise UserError(f"batch size must be at least 1, got {requested}")
            return requested
        if bytes_per_item < 1:
            raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
        estimate = self._automatic_batch(bytes_per_item)
        return max(self.settings.min_batch, min(self.settings.max_batch, estimate))

    def _automatic_batch(self, bytes_per_item: int) -> int:
        return CPU_BATCH

    def start_unit(self, unit: str) -> None:
        """A new unit starts with no micro-batch cap: a halving in one unit never slows the next."""
        self._micro_caps.clear()
        self._unit = unit

    @contextlib.contextmanager
    def memory_phase(self, phase: str) -> Iterator[None]:
        """`micro_batch` and `handle_oom` inside the block read and halve `phase`'s own cap."""
        previous, self._phase = self._phase, phase
        try:
            yield
        finally:
            self._phase = previous

    def micro_batch(self, batch: int) -> int:
        cap = self._micro_caps.get(self._phase)
        return batch if cap is None else min(batch, cap)

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        """Halve the micro-batch (auto_batch), or stop with the batch size to set instead."""
        if not isinstance(error, torch.OutOfMemoryError):
            return False
        old = self.micro_batch(batch)
        new = old // 2
        if new < 1:
            raise UserError(f"out of memory on {self.device} even with a micro-batch of 1: the model does "
                            f'not fit; use a smaller model, runner.precision = "bf16", or a larger device'
                            ) from error
        if not self.settings.auto_batch:
            raise UserError(f"out of memory on {self.device} at batch {old}: lower the batch size to {new}, "
                            f"or runner.auto_batch = true to halve the micro-batch automatically "
                            f"(same effective batch)") from error
        self._micro_caps[self._phase] = new
        self.oom_events.append({"batch": batch, "old_micro": old, "new_micro": new, "phase": self._phase,
                                "unit": self._unit})
        log.warning("out of memory on %s in %s at micro-batch %d: retrying with %d (gradients accumulated, "
                    "effective batch %d unchanged)", self.device, self._phase, old, new, batch)
        return True

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def shard(self, n: int) -> range:
        return range(n)

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        return last_row

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "resolved": self.resolved, "device": str(self.device),
                "precision": self.precision, "threads": torch.get_num_threads(),
                "auto_batch": self.settings.auto_batch, "micro_batch_caps": dict(self._micro_caps),
                "context_store": self.context_store, "context_dtype": self.context_dtype,
                "oom_events": list(self.oom_events), "rank": self.rank, "world_size": self.world_size}


class GPURunner(CPURunner):
    """One CUDA device: TF32 on, optional bf16 autocast, batch sized from free device memory."""

    name = "gpu"
    resolved = "gpu"

    def __init__(self, settings: RunnerSettings | None = None) -> None:
        super().__init__(settings)
        self.index = self.settings.device_index
        self.device = torch.device("cuda", self.index)
        self._saved_tf32: tuple[str, bool] | None = None

    def setup(self) -> None:
        gpu = cuda.backend()
        if not gpu.is_available():
            raise UserError('runner "gpu" needs CUDA, but none is available; use runner.name = "cpu"/"auto"')
        count = gpu.device_count()
        if self.index >= count:
            raise UserError(f"CUDA device {self.index} was requested (runner.device_index, or LOCAL_RANK "
                            f"under ddp), but only {count} exist (valid: 0..{count - 1})")
        super().setup()
        gpu.set_device(self.index)
        self._saved_tf32 = gpu.tf32_settings()
        gpu.set_tf32(self.settings.tf32)

    def teardown(self) -> None:
        """Puts back the TF32 settings `setup` changed (matmul precision and cuDNN's flag)."""
        if self._saved_tf32 is not None:
            cuda.backend().restore_tf32(self._saved_tf32)
            self._saved_tf32 = None
        super().teardown()

    def _automatic_batch(self, bytes_per_item: int) -> int:
        """Cost model: ⌊(total − allocated) · memory_fraction / bytes_per_item⌋.

        `total − allocated`, not the driver's free figure: memory the allocator has cached but not
        handed out is reusable (spec §7.4). `bytes_per_item` is the caller's peak cost of one item,
        e.g. Phase 2's `bytes_per_position` (the logits are chunked, so they are not per item).
        """
        gpu = cuda.backend()
        free = max(gpu.mem_get_info(self.index)[1] - gpu.memory_allocated(self.index), 0)
        batch = int(free * self.memory_fraction) // bytes_per_item
        log.info("automatic batch on %s: %.2f GiB free × %g / %d bytes per item = %d (before clamping)",
                 self.device, free / 2**30, self.memory_fraction, bytes_per_item, batch)
        return batch

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        cuda.backend().empty_cache()  # hand the failed attempt's cached blocks back before any retry
        return super().handle_oom(error, batch)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host tensors go through pinned memory so the copy overlaps with compute."""
        if tensor.device.type == "cpu":
            pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
            return pinned.to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "tf32": self.settings.tf32}
        gpu = cuda.backend()
        if gpu.is_available() and self.index < gpu.device_count():
            info["device_name"] = gpu.device_name(self.index)
            info["memory_total"] = gpu.mem_get_info(self.index)[1]
        return info


def auto_runner(settings: RunnerSettings | None = None) -> CPURunner:
    """`gpu` when CUDA is available, else `cpu`; the choice is logged and kept in describe()."""
    runner = GPURunner(settings) if cuda.backend().is_available() else CPURunner(settings)
    log.info("runner auto: CUDA is %savailable, using %s (%s)",
             "" if runner.resolved == "gpu" else "not ", runner.resolved, runner.device)
    runner.name = "auto"
    return runner


@hookimpl
def register_runners(register: Any) -> None:
    register("cpu", CPURunner, settings=RunnerSettings,
             description="one process on the CPU; threads and optional bf16 autocast")
    register("gpu", GPURunner, settings=RunnerSettings,
             description="one CUDA device; TF32, optional bf16, memory-based batch, OOM fallback")
    register("auto", auto_runner, settings=RunnerSettings,
             description="gpu when CUDA is available, else cpu")
