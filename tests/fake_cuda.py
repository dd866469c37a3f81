"""A fake CUDA backend: a configurable device table and a generator whose state is a draw counter.

The `fake_cuda` fixture (conftest.py) makes one the active backend of `newllm_kit.cuda` for a test;
a test changes its fields to describe the machine it needs (no CUDA, one device, a full card).
"""

from __future__ import annotations

from typing import Any

import torch

from newllm_kit.cuda import CudaBackend, Device

GiB = 2**30


class FakeCuda(CudaBackend):
    """Every `CudaBackend` method over plain fields; records the calls that change device state."""

    def __init__(self, available: bool = True, count: int = 2, total: int = 24 * GiB, allocated: int = 0,
                 driver_free: int | None = None, reserved: int | None = None) -> None:
        self.available, self.count, self.total, self.allocated = available, count, total, allocated
        self.driver_free = total - allocated if driver_free is None else driver_free
        self.reserved = allocated if reserved is None else reserved
        self.initialized = True  # whether this process has used CUDA (its generator is kept only then)
        self.draws = 0  # the generator's state: how many draws so far
        self.calls: list[tuple[Any, ...]] = []
        self.matmul_precision, self.cudnn_tf32 = "highest", True  # torch's defaults

    def is_available(self) -> bool:
        return self.available

    def is_initialized(self) -> bool:
        return self.available and self.initialized

    def device_count(self) -> int:
        return self.count if self.available else 0

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))

    def device_name(self, index: int) -> str:
        return "Fake L4"

    def mem_get_info(self, device: Device) -> tuple[int, int]:
        self.calls.append(("mem_get_info", device))
        return self.driver_free, self.total

    def memory_allocated(self, device: Device) -> int:
        return self.allocated

    def memory_reserved(self, device: Device) -> int:
        return self.reserved

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache",))

    def set_tf32(self, enabled: bool) -> None:
        self.calls.append(("set_tf32", enabled))
        self.matmul_precision, self.cudnn_tf32 = "high" if enabled else "highest", enabled

    def tf32_settings(self) -> tuple[str, bool]:
        return self.matmul_precision, self.cudnn_tf32

    def restore_tf32(self, settings: tuple[str, bool]) -> None:
        self.calls.append(("restore_tf32", settings))
        self.matmul_precision, self.cudnn_tf32 = settings

    def get_rng_state(self) -> torch.Tensor:
        return torch.tensor([self.draws], dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.draws = int(state[0])
