"""The one door to `torch.cuda`: every CUDA call of the core and the built-in plugins goes through the
active `CudaBackend`.

Keeping them behind one object is what lets the GPU logic (device checks, batch sizes from free memory,
the context stores' placement, the CUDA generator in checkpoints) run in tests on a machine without a
GPU: a test makes a subclass that fakes the device table the active backend with `set_backend`, and
puts the previous one back afterwards. Code asks `backend()` at the moment it calls, so a swap reaches
every caller, the runners included.
"""

from __future__ import annotations

import torch

Device = int | torch.device  # an index, or a torch.device (without an index: the current device)


class CudaBackend:
    """`torch.cuda` as the toolkit uses it; a fake overrides every method."""

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def is_initialized(self) -> bool:
        """Whether this process has used CUDA yet (only then does its generator hold a state worth keeping)."""
        return torch.cuda.is_initialized()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def device_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def mem_get_info(self, device: Device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)  # (free as the driver sees it, total) in bytes

    def memory_allocated(self, device: Device) -> int:
        return torch.cuda.memory_allocated(device)

    def memory_reserved(self, device: Device) -> int:
        """Bytes PyTorch's allocator holds, handed out or cached: the cached part is reusable."""
        return torch.cuda.memory_reserved(device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor cores for fp32 work, or not: cuBLAS matmuls (`torch.backends.cuda.matmul.allow_tf32`,
        through the matmul precision) and cuDNN (`torch.backends.cudnn.allow_tf32`: the GRU)."""
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled

    def tf32_settings(self) -> tuple[str, bool]:
        """What `set_tf32` changes, to put back with `restore_tf32`: (matmul precision, cuDNN's TF32 flag)."""
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32

    def restore_tf32(self, settings: tuple[str, bool]) -> None:
        torch.set_float32_matmul_precision(settings[0])
        torch.backends.cudnn.allow_tf32 = settings[1]

    def get_rng_state(self) -> torch.Tensor:
        """The current device's generator state."""
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state)


_active = CudaBackend()


def backend() -> CudaBackend:
    """The backend every CUDA call goes through now."""
    return _active


def set_backend(new: CudaBackend) -> CudaBackend:
    """Make `new` the active backend (a test's fake); returns the one it replaces, to put back."""
    global _active
    previous, _active = _active, new
    return previous
