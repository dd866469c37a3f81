"""Phase-2 epoch throughput as a fraction of this machine's fp32 GEMM peak, and bf16 vs fp32.

Builds the v2 config-A model (6L-768, gradual reduction, E = 768, V = 50,257, tied frozen head),
feeds it random frozen contexts and runs `train_phase2` for one epoch (train + validation).
FLOPs come from the layer shapes (`token_flops_per_token`: TokenBlock matmuls + 2·E·V for the
head, forward); a training position costs 3× forward (the chunked loss recomputes the logits in
backward instead of storing them, which makes the tied head's backward cost 2× its forward, so
3× holds for it as well), a validation position 1×. The peak is the best rate of a
[4096, 4096] @ [4096, 4096] fp32 matmul loop measured in the same process.
Both are reported by the wall clock (the target) and by the process CPU clock, which only counts
the cycles this process got and so is steadier on a machine other jobs share. The peak matmul
also runs after every timed epoch, so both sides of the ratio get the same chances of a quiet CPU.

bf16 runs under `torch.autocast(device, bfloat16)`. On CPUs without bf16 units (AVX2 only) torch's
bf16 matmul is a slow fallback, so the bf16 epoch is shrunk to `--bf16-budget` seconds (estimated
from a bf16 GEMM probe) and compared by achieved FLOP/s rather than by epoch time.

Phase 2 keeps one context per position and recomputes each batch's per-layer contexts with one
ContextBlock step. The fp32 epoch is also timed with every layer's contexts and the token inputs
precomputed and stored (how Phase 2 ran before), in the same run, alternating with the recompute
epochs: `recompute_overhead` is the extra epoch time (target ≤ 20 %), next to the modelled share
(ContextBlock forward FLOPs over the TokenBlock's and head's forward + backward).

    python benchmarks/phase2.py            # human-readable
    python benchmarks/phase2.py --json     # one JSON object on stdout
    python benchmarks/phase2.py --no-bf16  # only fp32: recompute vs stored
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
from newllm_kit_plugins.cvfp.contract import CVFPModel as Model
from newllm_kit_plugins.cvfp.model import (
    CVFPArchitecture,
    CVFPModel,
    CVFPSettings,
    context_flops_per_token,
    token_flops_per_token,
)
from newllm_kit_plugins.cvfp.phase2 import Phase2Data, Phase2Settings, train_phase2

VOCAB = 50257
TARGET_FRACTION_OF_PEAK = 0.80
TARGET_BF16_SPEEDUP = 2.5
TARGET_RECOMPUTE_OVERHEAD = 0.20


class BenchRunner:
    """A one-process runner: the given device, optional bf16 autocast, no micro-batching."""

    name, rank, world_size = "bench", 0, 1

    def __init__(self, device: torch.device, bf16: bool) -> None:
        self.device, self.bf16 = device, bf16
        self.precision = "bf16" if bf16 else "fp32"

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def barrier(self) -> None: ...

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

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


class Quiet:
    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None: ...


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`. On a shared CPU the CPU clock only counts the
    cycles this process got, so ratios of CPU-clock rates survive other people's jobs better."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def best_rates(flops: float, times: list[tuple[float, float]]) -> tuple[float, float]:
    """Best FLOP/s by the wall clock and by the CPU clock over repeated runs."""
    return flops / min(w for w, _ in times), flops / min(c for _, c in times)


class Gemm:
    """[size, size] @ [size, size] matmuls; `samples` keeps every timing, so the peak is the best seen."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int) -> None:
        self.device, self.flops = device, 2 * size**3
        self.samples: list[tuple[float, float]] = []
        self.a = torch.randn(size, size, device=device).to(dtype)
        self.b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(self.a, self.b)  # warm-up: thread pools, kernels

    def run(self, iterations: int = 1) -> tuple[float, float]:
        """Time `iterations` more matmuls; returns the best (wall, CPU-clock) FLOP/s so far."""
        self.samples += [timed(lambda: torch.mm(self.a, self.b), self.device) for _ in range(iterations)]
        return best_rates(self.flops, self.samples)


def build(device: torch.device) -> CVFPModel:
    torch.manual_seed(0)
    model = CVFPArchitecture(CVFPSettings(preset="6L-768")).build(VOCAB)
    model.set_embedding(torch.randn(VOCAB, model.embedding_dim) * 0.02, freeze=True)
    for p in model.param_groups()["phase1"]:
        p.requires_grad_(False)
    return model.to(device)


class StoredLayers(Phase2Data):
    """The same stream with every layer's contexts and the token inputs precomputed and kept: the
    baseline the recompute is measured against (Σ d_j + T floats per position instead of C)."""

    def __init__(self, data: Phase2Data, model: CVFPModel) -> None:
        super().__init__(data.contexts, data.ids)
        everything = super().batch(model, range(0, data.ids.numel() - 1), data.ids.device)
        self.layers, self.tokens = everything[0], everything[1]

    def batch(self, model: Model, rows: range, to: torch.device
              ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        lo, hi = rows.start, rows.stop
        return [h[lo:hi] for h in self.layers], self.tokens[lo:hi], self.ids[lo + 1:hi + 1]


def stream(model: CVFPModel, positions: int, seed: int, device: torch.device) -> Phase2Data:
    """Random ids and final-layer contexts with the solver's shapes: [n] and [n, C], n = positions + 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (positions + 1,), generator=g).to(device)
    return Phase2Data(torch.randn(positions + 1, model.context_dim, generator=g).to(device), ids)


def measure(model: CVFPModel, runners: dict[str, BenchRunner], positions: int, val_positions: int, batch: int,
            repeats: int, ce_chunk: int, peak: Gemm, stored: bool = False) -> dict[str, dict[str, Any]]:
    """Best time and FLOP/s of one full Phase-2 epoch (training + validation) per runner, by both clocks;
    with `stored`, also of the fp32 epoch over stored layers ("stored"). The variants alternate and a
    peak matmul runs after every epoch: all get the same chances of a quiet CPU."""
    device = next(iter(runners.values())).device
    train, val = stream(model, positions, 1, device), stream(model, val_positions, 2, device)
    variants = {name: (runner, train, val) for name, runner in runners.items()}
    if stored:
        variants["stored"] = (runners["fp32"], StoredLayers(train, model), StoredLayers(val, model))
    settings = Phase2Settings(epochs=1, batch_size=batch, restore_best=False, ce_chunk=ce_chunk)
    warm = stream(model, 2, 3, device)
    for runner in runners.values():
        train_phase2(model, warm, warm, settings, runner, Quiet())  # first-call costs (imports, allocator)
    forward = token_flops_per_token(model, include_head=True)
    flops = 3 * forward * train.positions + forward * val.positions
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (runner, t, v) in variants.items():
            times[name].append(timed(partial(train_phase2, model, t, v, settings, runner, Quiet()), device))
            peak.run()
    rows = {}
    for name, seen in times.items():
        wall, cpu = best_rates(flops, seen)
        rows[name] = {"train_positions": positions, "val_positions": val_positions, "batch_size": batch,
                      "epoch_flops": flops, "epoch_seconds": min(w for w, _ in seen),
                      "epoch_cpu_seconds": min(c for _, c in seen), "flops_per_s": wall, "flops_per_cpu_s": cpu}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--train-positions", type=int, default=2048)
    parser.add_argument("--val-positions", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1024, help="v2's Phase-2 batch")
    parser.add_argument("--ce-chunk", type=int, default=Phase2Settings().ce_chunk)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per precision (best is kept)")
    parser.add_argument("--gemm-iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bf16-budget", type=float, default=30.0,
                        help="seconds; without bf16 units (slow bf16 matmuls) the bf16 epoch shrinks to fit")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 epoch")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_gemm = Gemm(device, torch.float32, 4096)
    peak_before, _ = peak_gemm.run(args.gemm_iterations)
    probe = 512 if device.type == "cpu" else 4096  # CPUs without bf16 units run bf16 GEMMs ~100x slower
    bf16_gemm, _ = Gemm(device, torch.bfloat16, probe).run(args.gemm_iterations)
    model = build(device)
    forward = token_flops_per_token(model, include_head=True)
    fp32_runs = measure(model, {"fp32": BenchRunner(device, bf16=False)}, args.train_positions,
                        args.val_positions, args.batch_size, args.repeats, args.ce_chunk, peak_gemm, stored=True)
    fp32, stored = fp32_runs["fp32"], fp32_runs["stored"]
    rows = {"fp32": fp32, "stored": stored}
    if not args.no_bf16:
        # Predict the bf16 epoch rate (bf16 GEMM rate × the fp32 epoch's share of its GEMM peak) and shrink
        # the bf16 epoch (same model, fewer positions) to fit the budget.
        predicted = bf16_gemm * fp32["flops_per_s"] / peak_before
        fits = int(args.bf16_budget * predicted / (3 * forward * args.repeats))
        positions = max(8, min(args.train_positions, fits))
        val_positions = max(1, args.val_positions * positions // args.train_positions)
        rows["bf16"] = measure(model, {"bf16": BenchRunner(device, bf16=True)}, positions, val_positions,
                               min(args.batch_size, positions), args.repeats, args.ce_chunk, peak_gemm)["bf16"]
    peak, peak_cpu = peak_gemm.run(args.gemm_iterations)

    for row in rows.values():
        row["fraction_of_fp32_gemm_peak"] = row["flops_per_s"] / peak
        row["fraction_of_fp32_gemm_peak_cpu_clock"] = row["flops_per_cpu_s"] / peak_cpu
    overhead = fp32["epoch_seconds"] / stored["epoch_seconds"] - 1
    overhead_cpu = fp32["epoch_cpu_seconds"] / stored["epoch_cpu_seconds"] - 1
    context = context_flops_per_token(model)
    modelled = context * (fp32["train_positions"] + fp32["val_positions"]) / fp32["epoch_flops"]
    speedup = rows["bf16"]["flops_per_s"] / fp32["flops_per_s"] if "bf16" in rows else None
    report = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": "v2 config A: 6L-768 gradual-reduction, E=768, V=50257, tied frozen head",
        "ce_chunk": args.ce_chunk, "forward_flops_per_token": forward, "context_flops_per_token": context,
        "gemm_fp32_peak_flops_per_s": peak, "gemm_fp32_peak_flops_per_cpu_s": peak_cpu,
        "gemm_bf16_flops_per_s": bf16_gemm, **rows, "bf16_speedup_over_fp32": speedup,
        "recompute_overhead": overhead, "recompute_overhead_cpu_clock": overhead_cpu,
        "recompute_modelled_share": modelled,
        "targets": {"fp32_fraction_of_peak": TARGET_FRACTION_OF_PEAK, "bf16_speedup": TARGET_BF16_SPEEDUP,
                    "recompute_overhead": TARGET_RECOMPUTE_OVERHEAD},
        "met": {"fp32_fraction_of_peak": fp32["fraction_of_fp32_gemm_peak"] >= TARGET_FRACTION_OF_PEAK,
                "bf16_speedup": None if speedup is None else speedup >= TARGET_BF16_SPEEDUP,
                "recompute_overhead": overhead <= TARGET_RECOMPUTE_OVERHEAD},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"device {device} ({report['threads']} threads); fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s "
          f"({peak_cpu / 1e9:.1f} per CPU-second), bf16 GEMM {bf16_gemm / 1e9:.2f} GFLOP/s")
    for name, row in rows.items():
        rate = row["flops_per_s"] / 1e9
        print(f"{name}: {row['train_positions']} + {row['val_positions']} positions, "
              f"batch {row['batch_size']}: epoch {row['epoch_seconds']:.2f} s, {rate:.2f} GFLOP/s = "
              f"{row['fraction_of_fp32_gemm_peak']:.3f} of the fp32 GEMM peak "
              f"({row['fraction_of_fp32_gemm_peak_cpu_clock']:.3f} by the CPU clock)")
    print(f"recompute vs stored layers: {overhead:+.1%} epoch time ({overhead_cpu:+.1%} by the CPU clock; "
          f"modelled {modelled:.1%}); target ≤ {TARGET_RECOMPUTE_OVERHEAD:.0%}")
    if speedup is not None:
        print(f"bf16 / fp32 speed {speedup:.3f}x (target {TARGET_BF16_SPEEDUP}x); "
              f"fp32 fraction of peak target {TARGET_FRACTION_OF_PEAK}")


if __name__ == "__main__":
    main()
