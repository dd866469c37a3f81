"""The CUDA backend: the one door to `torch.cuda`, and the swap that lets tests fake a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from fake_cuda import FakeCuda

from newllm_kit import cuda, params
from newllm_kit.cuda import CudaBackend

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_but_the_backend_calls_torch_cuda() -> None:
    """Every CUDA call of the core and the built-in plugins goes through `newllm_kit.cuda`, so a fake
    backend reaches all of them."""
    calls = re.compile(r"\btorch\.cuda\b|\bfrom torch import\b.*\bcuda\b|\bimport torch\.cuda\b")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for folder in ("newllm_kit", "plugins") for path in sorted((ROOT / folder).rglob("*.py"))
             if path != ROOT / "newllm_kit" / "cuda.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if calls.search(line) and not line.lstrip().startswith("#") and "`torch.cuda`" not in line]
    assert found == []


def test_the_fake_overrides_every_call_of_the_backend() -> None:
    """A backend method the fake left to the real class would reach torch.cuda in a test."""
    methods = {name for name, value in vars(CudaBackend).items() if callable(value) and not name.startswith("_")}
    assert methods <= {name for name, value in vars(FakeCuda).items() if callable(value)}


def test_set_backend_swaps_the_active_backend_and_returns_the_one_it_replaced() -> None:
    fake = FakeCuda()
    real = cuda.set_backend(fake)
    try:
        assert cuda.backend() is fake and type(real) is CudaBackend
    finally:
        assert cuda.set_backend(real) is fake
    assert cuda.backend() is real


def test_free_memory_of_a_cuda_device_is_the_driver_s_figure(fake_cuda: FakeCuda) -> None:
    fake_cuda.driver_free = 5 * 2**30
    assert params.available_bytes(torch.device("cuda", 1)) == 5 * 2**30
    assert fake_cuda.calls == [("mem_get_info", torch.device("cuda", 1))]
    assert params.available_bytes(torch.device("meta")) is None
