"""Frozen solve: `auto` against the best batch-1 sequential rollout, at the same max error.

For each configuration: a random-init model (spec §2.1 init, random GPT-2-sized embedding), a
stream of `--tokens` random ids, and

* the sequential rollout's time per token, best of 1 and 2 threads (it is exactly linear in n,
  so it is timed on `--sample` tokens and scaled to the stream: a full rollout of 32k tokens
  would take minutes per configuration here; its token projection, one batch per block, is
  included);
* `CVFPPhase1Solver.solve` with `solve = "auto"` over the whole stream, end to end (gain estimate,
  burn-in scan, run-on checks, token projection included);
* the max |error| of `auto` and of the fp32 sequential rollout (final-layer contexts, the ones a
  solve keeps) against a float64 rollout over the first `--reference` tokens ("same max error":
  fp32 rounding alone puts a trained block's rollout ~1e-5 from the exact one), and the burn-in
  error `auto` measured itself at every chunk start of the whole stream.

When the block does not contract (ρ ≥ 1) `auto` is the sequential rollout plus a gain estimate;
that case is run on `--sample` tokens only. Random-init gradual-reduction blocks (A, B) do not
contract (ρ ≈ 1.28 and 1.13); Phase 1 makes them contract, so `--train-passes P` first trains
the block for P Phase-1 passes (v2 settings, random iteration 0) on `--train-tokens` tokens.

    python benchmarks/frozen_solve.py                 # configs A, B (v2) and A-every, B-every
    python benchmarks/frozen_solve.py --json --tokens 65536 --configs A-every
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import torch
from _common import CONFIGS, VOCAB, BenchRunner, QuietProgress, cvfp_model, emit, machine
from newllm_kit_plugins.cvfp.frozen_solve import Tokens, burn_in, estimate_gain, rollout
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver

TARGET_SPEEDUP = 3.0
TOLERANCE = 1e-5


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class Float64Block:
    """The model's token inputs (fp32, as the kit computes them) into a float64 copy of its ContextBlock."""

    def __init__(self, model: Any) -> None:
        self.model, self.context_dim = model, model.context_dim
        self.num_input_tokens = model.num_input_tokens
        self.context_block = copy.deepcopy(model.context_block).double()

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_inputs(ids).double()


def rolled_out(model: Any, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sequential rollout's contexts (in float64 for the reference)."""
    out = torch.empty(ids.shape[0], model.context_dim, dtype=dtype)
    rollout(model.context_block, Tokens(model, ids), out)
    return out


def sequential_seconds_per_token(model: Any, ids: torch.Tensor) -> dict[str, float]:
    """Best batch-1 rollout time per token over thread counts."""
    saved, best = torch.get_num_threads(), {}
    for threads in sorted({1, min(2, os.cpu_count() or 1), saved}):
        torch.set_num_threads(threads)
        rolled_out(model, ids[:64])  # warm-up
        times = []
        for _ in range(2):
            started = time.perf_counter()
            rolled_out(model, ids)
            times.append(time.perf_counter() - started)
        best[f"threads_{threads}"] = min(times) / ids.shape[0]
    torch.set_num_threads(saved)
    return best


def run(config: str, tokens: int, sample: int, reference: int, train_passes: int,
        train_tokens: int) -> dict[str, Any]:
    model = cvfp_model(config)
    if train_passes:
        settings = CVFPPhase1Settings(init="random", max_iterations=train_passes + 1, min_iterations=10**6)
        torch.manual_seed(1)
        CVFPPhase1Solver(settings).fit(model, token_ids(train_tokens, seed=1), BenchRunner(), QuietProgress())
    model.eval()
    stream = token_ids(tokens)
    with torch.no_grad():
        per_token = sequential_seconds_per_token(model, stream[:sample])
        gain = estimate_gain(model.context_block, Tokens(model, stream), model.context_dim)
    contracting = gain.gain < 1
    n = tokens if contracting else sample
    reference = min(reference, n)
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve="auto", solve_tolerance=TOLERANCE))
    started = time.perf_counter()
    result = solver.solve(model, stream[:n], BenchRunner())
    seconds = time.perf_counter() - started
    with torch.no_grad():
        fp32 = rolled_out(model, stream[:reference])
        truth = rolled_out(Float64Block(model), stream[:reference], torch.float64)

    def error(contexts: torch.Tensor) -> float:
        return (contexts[:reference].double() - truth).abs().max().item()
    sequential = min(per_token.values()) * n
    return {
        "config": config, "settings": CONFIGS[config], "phase1_passes": train_passes, "tokens": n,
        "gain": gain.gain,
        "burn_in_W": burn_in(gain, TOLERANCE) if contracting else None,
        "method": result.method, "extra": {k: v for k, v in result.extra.items() if k != "modelled_seconds"},
        "auto_seconds": seconds, "sequential_seconds_per_token": per_token,
        "sequential_seconds": sequential, "speedup": sequential / seconds,
        "max_error_auto_vs_float64": error(result.layers[0]), "max_error_sequential_vs_float64": error(fp32),
        "reference_tokens": reference,
        "measured_burn_in_error": result.max_change, "token_evaluations": result.token_evaluations,
        "meets_target": contracting and sequential / seconds >= TARGET_SPEEDUP
        and error(result.layers[0]) <= max(TOLERANCE, error(fp32)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B,A-every,B-every")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--sample", type=int, default=512, help="tokens the sequential rollout is timed on")
    parser.add_argument("--reference", type=int, default=1024, help="prefix checked against float64")
    parser.add_argument("--train-passes", type=int, default=0, help="Phase-1 passes before solving")
    parser.add_argument("--train-tokens", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run(c, args.tokens, args.sample, args.reference, args.train_passes, args.train_tokens)
               for c in args.configs.split(",")]
    lines = [f"machine: {machine()}"]
    for r in results:
        lines.append(
            f"{r['config']:8s} (+{r['phase1_passes']} Phase-1 passes) ρ={r['gain']:.3f} W={r['burn_in_W']} "
            f"-> {r['method']:10s} n={r['tokens']:6d} "
            f"auto {r['auto_seconds']:7.2f} s vs sequential {r['sequential_seconds']:7.2f} s "
            f"= {r['speedup']:5.2f}x; max error vs float64 {r['max_error_auto_vs_float64']:.2e} "
            f"(sequential fp32 {r['max_error_sequential_vs_float64']:.2e}; measured at chunk starts "
            f"{r['measured_burn_in_error']}) {r['extra']}")
    emit({"machine": machine(), "target_speedup": TARGET_SPEEDUP, "tolerance": TOLERANCE, "results": results},
         args.json, lines)


if __name__ == "__main__":
    main()
