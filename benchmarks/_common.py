"""Shared pieces of the solver benchmarks: the machine, its same-run GEMM peak, models and a runner.

Ratios against a GEMM peak measured in the same process stay meaningful on a machine that other
work also uses (the peak drops with the benchmark); absolute seconds do not, so every script
prints the load average next to its numbers.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPModel, CVFPSettings

VOCAB = 50257  # GPT-2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": cuda, "load_average": [round(x, 2) for x in os.getloadavg()]}


def best_seconds(work: Callable[[], Any], repeats: int = 3, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeats` runs after one warm-up: the least disturbed by other load."""
    work()
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def gemm_peak(dtype: torch.dtype, device: str = "cpu", budget_s: float = 3.0) -> dict[str, float]:
    """Best FLOP/s of a square fp32 matmul, run the way the model runs it (bf16: under autocast).

    2048² (4096² on CUDA). On CPUs without bf16 units (AVX2 only) torch's bf16 matmul is a slow
    fallback; the size then shrinks until one product fits in a quarter of `budget_s`.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    precision = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    size = 4096 if device == "cuda" else 2048
    with precision:
        while True:
            a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
            started = time.perf_counter()
            torch.mm(a, b)
            sync()
            once = time.perf_counter() - started
            if once * 4 <= budget_s or size <= 256:
                break
            size //= 2
        repeats = max(1, min(10, int(budget_s / max(once, 1e-6) / 2)))
        seconds = best_seconds(lambda: torch.mm(a, b), repeats, sync)
    return {"gflops": 2 * size**3 / seconds / 1e9, "size": float(size)}


class BenchRunner:
    """The Runner protocol on one process: a device, optional bf16 autocast, identity collectives."""

    name, rank, world_size = "bench", 0, 1

    def __init__(self, device: str = "cpu", precision: str = "fp32") -> None:
        self.device, self.precision = torch.device(device), precision

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def barrier(self) -> None: ...

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        return requested or 1024

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": str(self.device), "precision": self.precision}

    def micro_batch(self, batch: int) -> int:
        return batch

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        return False

    def shard(self, n: int) -> range:
        return range(n)

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        return last_row

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor


class QuietProgress:
    """Progress that remembers the advances (for per-pass timings) and prints nothing."""

    def __init__(self) -> None:
        self.advances: list[dict[str, float]] = []

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None:
        self.advances.append(fields)

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None: ...


# The v2 configurations (spec §2.4) and the 11/27 / v1 all-layer wiring of the same sizes.
CONFIGS: dict[str, dict[str, Any]] = {
    "A": {"preset": "6L-768", "variant": "gradual-reduction"},
    "B": {"preset": "3L-1536", "variant": "gradual-reduction"},
    "A-every": {"preset": "6L-768", "variant": "token-every-layer"},
    "B-every": {"preset": "3L-1536", "variant": "token-every-layer"},
    "S": {"layers": 3, "context_dim": 256, "embedding_dim": 256, "variant": "gradual-reduction"},  # small v2
}


def cvfp_model(config: str, seed: int = 0, device: str = "cpu") -> CVFPModel:
    """A random-init model (spec §2.1 init) with a random GPT-2-sized embedding table."""
    torch.manual_seed(seed)
    model = CVFPArchitecture(CVFPSettings(**CONFIGS[config])).build(VOCAB)  # GPT-2 vocabulary size
    generator = torch.Generator().manual_seed(seed)
    model.set_embedding(torch.randn(VOCAB, model.embedding_dim, generator=generator) * 0.02, freeze=True)
    return model.to(device)


def token_stream(model: CVFPModel, n: int, seed: int = 0) -> torch.Tensor:
    """[n, T] token inputs of n random GPT-2 ids (no gradient: computed once, as the kit does)."""
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.token_inputs(ids.to(model.embedding.weight.device))


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """One JSON object (--json) or the human-readable lines."""
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))
