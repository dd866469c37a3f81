"""GPU check: the frozen solves and a short Phase 1 on CUDA, compared with the CPU, with throughput.

1. Frozen solves (sequential, jacobi, chunked, auto) of the v2-A-sized all-layer block (ρ ≈ 0.49)
   on `--solve-tokens` tokens, on CUDA and on the CPU: max |CUDA − CPU| per method (fp32, TF32
   off inside the solve), seconds and tokens/s; then `auto` alone on `--tokens` tokens on CUDA.
2. Phase 1 of config A (gradual reduction, v2 settings, random iteration 0, no noise so both
   devices see the same inputs) for `--passes` passes on `--phase1-tokens` tokens, CUDA vs CPU:
   max |Δ contexts| and per-pass losses; then CUDA throughput in fp32 and bf16 (autocast), as
   achieved TFLOP/s (context_flops_per_token × 3 × n per pass).

Exits with a message when CUDA is not available; `--device cpu` runs the same script on the CPU
against itself (a dry run of the code path, with small sizes).

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --json
    python benchmarks/gpu_check.py --device cpu --solve-tokens 512 --tokens 2048 --phase1-tokens 512
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from _common import BenchRunner, QuietProgress, cvfp_model, emit, machine, token_stream
from newllm_kit_plugins.cvfp import context_flops_per_token
from newllm_kit_plugins.fixed_point import CVFPSolver, CVFPSolverSettings

METHODS = ("sequential", "jacobi", "chunked", "auto")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_solve(config: str, device: str, tokens: int, method: str) -> tuple[list[torch.Tensor], Any, float]:
    model = cvfp_model(config, device=device)
    stream = token_stream(model, tokens)
    solver = CVFPSolver(CVFPSolverSettings(solve=method))
    solver.solve(model, stream[: min(tokens, 256)], BenchRunner(device))  # warm-up (kernels, allocator)
    sync(device)
    started = time.perf_counter()
    result = solver.solve(model, stream, BenchRunner(device))
    sync(device)
    return [h.cpu() for h in result.layers], result, time.perf_counter() - started


def solves(device: str, tokens: int, long_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in METHODS:
        on_device, result, seconds = timed_solve("A-every", device, tokens, method)
        on_cpu, _, cpu_seconds = timed_solve("A-every", "cpu", tokens, method)
        diff = max((a - b).abs().max().item() for a, b in zip(on_device, on_cpu, strict=True))
        out[method] = {"resolved": result.method, "max_abs_diff_vs_cpu": diff, "seconds": seconds,
                       "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds, "gain": result.gain,
                       "extra": {k: v for k, v in result.extra.items() if k != "modelled_seconds"}}
    _, result, seconds = timed_solve("A-every", device, long_tokens, "auto")
    out["auto_long"] = {"tokens": long_tokens, "resolved": result.method, "seconds": seconds,
                        "tokens_per_s": long_tokens / seconds, "burn_in_error": result.max_change}
    return out


def phase1(device: str, precision: str, tokens: int, passes: int) -> dict[str, Any]:
    model = cvfp_model("A", device=device)
    stream = token_stream(model, tokens)
    settings = CVFPSolverSettings(init="random", context_noise=0.0, max_iterations=passes + 1,
                                  min_iterations=passes + 1)
    torch.manual_seed(1)
    sync(device)
    report = CVFPSolver(settings).fit(model, stream, BenchRunner(device, precision), QuietProgress())
    sync(device)
    seconds = min(h["seconds"] for h in report.history)
    flops = context_flops_per_token(model) * 3 * tokens
    return {"device": device, "precision": precision, "contexts": report.contexts.cpu(),
            "losses": [h["loss"] for h in report.history], "pass_seconds": seconds,
            "tflops": flops / seconds / 1e12, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--solve-tokens", type=int, default=4096, help="per-method comparison (CPU side too)")
    parser.add_argument("--tokens", type=int, default=262144, help="auto alone, on the device")
    parser.add_argument("--phase1-tokens", type=int, default=16000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available on this machine (torch "
                 f"{torch.__version__}); nothing to check. Use --device cpu for a dry run.")
    solved = solves(args.device, args.solve_tokens, args.tokens)
    fp32 = phase1(args.device, "fp32", args.phase1_tokens, args.passes)
    cpu = phase1("cpu", "fp32", args.phase1_tokens, args.passes)
    bf16 = phase1(args.device, "bf16", args.phase1_tokens, args.passes)
    phase1_diff = (fp32.pop("contexts") - cpu.pop("contexts")).abs().max().item()
    bf16.pop("contexts")
    lines = [f"machine: {machine()}"]
    for method, r in solved.items():
        lines.append(f"solve {method:10s}: {r}")
    lines += [f"phase 1 fp32 {args.device}: {fp32}", f"phase 1 fp32 cpu: {cpu}",
              f"phase 1 max |Δ contexts| {args.device} vs cpu after {args.passes} passes: {phase1_diff:.3e}",
              f"phase 1 bf16 {args.device}: {bf16}"]
    emit({"machine": machine(), "device": args.device, "solves": solved,
          "phase1": {"fp32": fp32, "cpu": cpu, "bf16": bf16, "max_abs_diff_contexts": phase1_diff}},
         args.json, lines)


if __name__ == "__main__":
    main()
