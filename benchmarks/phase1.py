"""Phase-1 sweep throughput as a fraction of this machine's GEMM peak, fp32 and bf16.

Runs `CVFPPhase1Solver.fit` (random iteration 0, so no rollout, v2 settings otherwise: 8000-token
chunks, noise 0.1, one Adam step per pass) for `--passes` passes over `--tokens` random token ids
of the v2 configurations and takes the fastest pass (token inputs included: they are computed
per chunk from the ids). FLOPs per pass = `context_flops_per_token` ×
3 × n (forward + backward, as nanoGPT counts). That slightly over-counts: layer 1's inputs (the
detached contexts and the token inputs) need no input gradient, so the exact matmul count is
also printed ("exact"). The peak is the best square-matmul rate measured in the same process
before and after the sweeps (the larger one is used).

bf16 runs the same sweep under `torch.autocast(bfloat16)`. On a CPU without bf16 units (AVX2
only) torch's bf16 matmul is a scalar fallback hundreds of times slower than fp32: the bf16 sweep
then uses `--bf16-tokens` tokens and is compared with the same-run bf16 GEMM rate.

`--memory N1,N2` instead measures the peak RSS of one whole Phase-1 fit (rollout iteration 0 and
one pass, one thread) of the first config at each stream length, each in a fresh process
(`resource` ru_maxrss: torch's allocations are invisible to tracemalloc), and prints the bytes per
token, (RSS₂ − RSS₁)/(N₂ − N₁): one fp32 context per token (4·C) plus the ids. Take both lengths
above a chunk (8000): below it the chunk's activations grow with the stream too.

    python benchmarks/phase1.py
    python benchmarks/phase1.py --json --configs A --tokens 16000
    python benchmarks/phase1.py --configs S --memory 40000,160000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch
from _common import VOCAB, BenchRunner, QuietProgress, cvfp_model, emit, gemm_peak, machine
from newllm_kit_plugins.cvfp.model import context_flops_per_token
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from torch import nn

TARGET_FRACTION = 0.85


def exact_flops_per_token(model: Any) -> int:
    """Forward + weight gradients of every Linear + input gradients of all but layer 1's context half.

    Layer 1 reads the detached context and the token input, neither of which needs a gradient.
    """
    linears = [m for m in model.context_block.modules() if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    first = sum(m.weight.numel() for split in model.context_block.splits for m in split[0].modules()
                if isinstance(m, nn.Linear))
    return 2 * (3 * total - first)


def sweep_rate(config: str, tokens: int, passes: int, precision: str) -> dict[str, Any]:
    model = cvfp_model(config)
    stream = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(0))
    settings = CVFPPhase1Settings(init="random", max_iterations=passes + 1, min_iterations=passes + 1)
    progress = QuietProgress()
    torch.manual_seed(1)
    report = CVFPPhase1Solver(settings).fit(model, stream, BenchRunner(precision=precision), progress)
    seconds = min(h["seconds"] for h in report.history)
    counted = context_flops_per_token(model) * 3 * tokens
    exact = exact_flops_per_token(model) * tokens
    return {"config": config, "precision": precision, "tokens": tokens, "pass_seconds": seconds,
            "all_pass_seconds": [h["seconds"] for h in report.history],
            "gflops_counted": counted / seconds / 1e9, "gflops_exact": exact / seconds / 1e9,
            "loss": report.history[-1]["loss"]}


def fit_peak_rss(config: str, tokens: int) -> dict[str, Any]:
    """One fit in this (fresh) process: peak RSS before and after (ru_maxrss is in KiB on Linux)."""
    torch.set_num_threads(1)
    model = cvfp_model(config)
    ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    settings = CVFPPhase1Settings(init="rollout", solve="sequential", max_iterations=2, min_iterations=2)
    torch.manual_seed(1)
    CVFPPhase1Solver(settings).fit(model, ids, BenchRunner(), QuietProgress())
    return {"tokens": tokens, "rss_before_fit": before,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory_slope(config: str, lengths: list[int]) -> dict[str, Any]:
    runs = [json.loads(subprocess.run([sys.executable, __file__, "--rss-child", config, str(n)], check=True,
                                      capture_output=True, text=True).stdout) for n in lengths]
    slope = (runs[-1]["peak_rss"] - runs[0]["peak_rss"]) / (lengths[-1] - lengths[0])
    return {"config": config, "runs": runs, "bytes_per_token": slope}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument("--tokens", type=int, default=8000, help="one v2 chunk")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--bf16-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory", default=None, help="N1,N2: peak RSS per token of a fit instead")
    parser.add_argument("--rss-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(fit_peak_rss(args.rss_child[0], int(args.rss_child[1]))))
        return
    if args.memory:
        result = memory_slope(args.configs.split(",")[0], [int(n) for n in args.memory.split(",")])
        peaks = ", ".join(f"{r['tokens']:,} tokens: {r['peak_rss'] / 2**20:,.0f} MiB" for r in result["runs"])
        emit({"machine": machine(), **result}, args.json, [
            f"machine: {machine()}",
            f"{result['config']}: {result['bytes_per_token']:,.0f} bytes of peak RSS per token ({peaks})"])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results, lines = [], [f"machine: {machine()}"]
    plans = [("fp32", torch.float32, args.tokens), ("bf16", torch.bfloat16, args.bf16_tokens)]
    for precision, dtype, tokens in plans:
        before = gemm_peak(dtype)
        runs = [sweep_rate(c, tokens, args.passes, precision) for c in args.configs.split(",")]
        after = gemm_peak(dtype)
        peak = max(before["gflops"], after["gflops"])
        for r in runs:
            r.update(peak_gflops=peak, peak_before=before, peak_after=after,
                     fraction_counted=r["gflops_counted"] / peak, fraction_exact=r["gflops_exact"] / peak)
            r["meets_target"] = precision == "fp32" and r["fraction_counted"] >= TARGET_FRACTION
            lines.append(f"{r['config']} {precision}: {tokens} tokens, pass {r['pass_seconds']:.2f} s, "
                         f"{r['gflops_counted']:.1f} GFLOP/s counted ({r['fraction_counted']:.2f} of peak "
                         f"{peak:.1f}), {r['gflops_exact']:.1f} exact ({r['fraction_exact']:.2f})")
            results.append(r)
    emit({"machine": machine(), "target_fraction": TARGET_FRACTION, "results": results}, args.json, lines)


if __name__ == "__main__":
    main()
