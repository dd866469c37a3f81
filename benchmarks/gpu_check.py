"""GPU check: the frozen solves, a short Phase 1 and Phase 2 on CUDA, compared with the CPU, with throughput.

1. Frozen solves (sequential, jacobi, chunked, auto) of the v2-A-sized all-layer block (ρ ≈ 0.49)
   on `--solve-tokens` tokens, on CUDA and on the CPU: max |CUDA − CPU| per method (fp32, TF32
   off inside the solve), seconds and tokens/s; then `auto` alone on `--tokens` tokens on CUDA.
2. Phase 1 of config A (gradual reduction, v2 settings, random iteration 0, no noise so both
   devices see the same inputs) for `--passes` passes on `--phase1-tokens` tokens, CUDA vs CPU:
   max |Δ contexts| and per-pass losses; then CUDA throughput in fp32 and bf16 (autocast), as
   achieved TFLOP/s (context_flops_per_token × 3 × n per pass).
3. Phase 2 of config A through the real `gpu` and `cpu` runners: two epochs on `--phase2-positions`
   random-context positions from the same initial weights (TF32 off), val losses and TokenBlock
   weights compared; then one `--phase2-long`-position epoch per precision (fp32 with TF32, bf16)
   for positions/s and TFLOP/s.
4. Device memory of whole CLI runs (`benchmarks/scale.py`'s runs: synthetic corpus, 6 layers at
   C = E = 256, 2 Phase-1 passes, one epoch) at the two `--memory-tokens` stream lengths, once per
   context store the kit accepts (device, host): `torch.cuda.max_memory_allocated` of each run and
   its growth per training token, which a host store should keep near 0. On the CPU: peak RSS.

Exits with a message when CUDA is not available; `--device cpu` runs the same script on the CPU
against itself (a dry run of the code path, with small sizes).

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --json
    python benchmarks/gpu_check.py --device cpu --solve-tokens 512 --tokens 2048 --phase1-tokens 512 \
        --phase2-positions 256 --phase2-long 512 --memory-tokens 2000,4000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import VOCAB, BenchRunner, QuietProgress, cvfp_model, emit, machine
from newllm_kit_plugins.cvfp.model import context_flops_per_token
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver

METHODS = ("sequential", "jacobi", "chunked", "auto")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_ids(n: int, device: str) -> torch.Tensor:
    """n seeded GPT-2 ids: the same stream on every device."""
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0)).to(device)


def timed_solve(config: str, device: str, tokens: int, method: str) -> tuple[list[torch.Tensor], Any, float]:
    model = cvfp_model(config, device=device)
    stream = random_ids(tokens, device)
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve=method))
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
    stream = random_ids(tokens, device)
    settings = CVFPPhase1Settings(init="random", context_noise=0.0, max_iterations=passes + 1,
                                  min_iterations=passes + 1)
    torch.manual_seed(1)
    sync(device)
    report = CVFPPhase1Solver(settings).fit(model, stream, BenchRunner(device, precision), QuietProgress())
    sync(device)
    seconds = min(h["seconds"] for h in report.history)
    flops = context_flops_per_token(model) * 3 * tokens
    return {"device": device, "precision": precision, "contexts": report.contexts.cpu(),
            "losses": [h["loss"] for h in report.history], "pass_seconds": seconds,
            "tflops": flops / seconds / 1e12, "tokens_per_s": tokens / seconds}


def phase2_check(device: str, positions: int, long_positions: int) -> dict[str, Any]:
    """Phase 2 of v2 config A through the real runners: 2 epochs on CUDA (TF32 off) vs the CPU from the
    same initial weights and data, then CUDA epoch throughput in fp32 (TF32 on) and bf16."""
    import phase2 as bench  # benchmarks/phase2.py: the model and random-context streams it times
    from newllm_kit_plugins.cvfp.frozen_solve import full_precision_matmuls
    from newllm_kit_plugins.cvfp.phase2 import Phase2Settings, train_phase2
    from newllm_kit_plugins.runners.local import CPURunner, GPURunner, RunnerSettings

    def runner(dev: str, precision: str) -> Any:
        built = (GPURunner if dev == "cuda" else CPURunner)(RunnerSettings(precision=precision))
        built.setup()
        return built

    def run(dev: str, precision: str, n: int, epochs: int) -> tuple[Any, Any, float]:
        model = bench.build(torch.device(dev))
        train = bench.stream(model, n, 1, torch.device(dev))
        val = bench.stream(model, max(n // 8, 64), 2, torch.device(dev))
        settings = Phase2Settings(epochs=epochs, patience=epochs, batch_size=1024, restore_best=False)
        sync(dev)
        started = time.perf_counter()
        report = train_phase2(model, train, val, settings, runner(dev, precision), QuietProgress())
        sync(dev)
        return model, report, time.perf_counter() - started

    with full_precision_matmuls():
        on_device, device_report, _ = run(device, "fp32", positions, 2)
        on_cpu, cpu_report, _ = run("cpu", "fp32", positions, 2)
    weight_diff = max((a.detach().cpu() - b.detach()).abs().max().item()
                      for a, b in zip(on_device.token_block.parameters(), on_cpu.token_block.parameters(),
                                      strict=True))
    losses = [(d["val_loss"], c["val_loss"]) for d, c in zip(device_report.history, cpu_report.history,
                                                             strict=True)]
    out: dict[str, Any] = {"positions": positions, "val_losses_device_cpu": losses,
                           "max_rel_diff_val_loss": max(abs(d - c) / abs(c) for d, c in losses),
                           "max_abs_diff_token_block": weight_diff}
    model = bench.build(torch.device(device))
    forward = bench.token_flops_per_token(model, include_head=True)
    for precision in ("fp32", "bf16"):
        run(device, precision, 4096, 1)  # warm-up: kernels, allocator
        _, _, seconds = run(device, precision, long_positions, 1)
        flops = 3 * forward * long_positions + forward * max(long_positions // 8, 64)
        out[precision] = {"positions": long_positions, "epoch_seconds": seconds,
                          "positions_per_s": long_positions / seconds, "tflops": flops / seconds / 1e12}
    return out


def device_memory(device: str, sizes: list[int]) -> dict[str, Any]:
    """Peak device memory (peak RSS on the CPU) of CLI runs at each stream length, per context store,
    and its least-squares growth in bytes per training token."""
    import scale  # benchmarks/scale.py: the experiment files and the measured CLI runs

    key = "device_peak" if device == "cuda" else "peak_rss"
    out: dict[str, Any] = {"measured": key}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        root = Path(temporary)
        configs = scale.write_configs(root, sizes, iterations=2, runner="gpu" if device == "cuda" else "cpu")
        choices: list[str | None] = [*scale.accepted_stores(configs[0], ["device", "host"], [])] or [None]
        for store in choices:
            runs = scale.sweep(configs, root, store, [])
            tokens, peaks = [r["tokens"] for r in runs], [r[key] for r in runs]
            out[store or "default"] = {"tokens": tokens, "peak_bytes": peaks,
                                       "bytes_per_token": scale.slope(tokens, peaks)[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--solve-tokens", type=int, default=4096, help="per-method comparison (CPU side too)")
    parser.add_argument("--tokens", type=int, default=262144, help="auto alone, on the device")
    parser.add_argument("--phase1-tokens", type=int, default=16000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--phase2-positions", type=int, default=2048, help="CUDA vs CPU comparison")
    parser.add_argument("--phase2-long", type=int, default=65536, help="throughput epoch, on the device")
    parser.add_argument("--memory-tokens", default="8000,32000", help="two stream lengths of the memory check")
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
    second = phase2_check(args.device, args.phase2_positions, args.phase2_long)
    memory = device_memory(args.device, sorted(int(n) for n in args.memory_tokens.split(",")))
    lines = [f"machine: {machine()}"]
    for method, r in solved.items():
        lines.append(f"solve {method:10s}: {r}")
    lines += [f"phase 1 fp32 {args.device}: {fp32}", f"phase 1 fp32 cpu: {cpu}",
              f"phase 1 max |Δ contexts| {args.device} vs cpu after {args.passes} passes: {phase1_diff:.3e}",
              f"phase 1 bf16 {args.device}: {bf16}",
              f"phase 2 {args.device} vs cpu: {second}", f"memory of CLI runs: {memory}"]
    emit({"machine": machine(), "device": args.device, "solves": solved,
          "phase1": {"fp32": fp32, "cpu": cpu, "bf16": bf16, "max_abs_diff_contexts": phase1_diff},
          "phase2": second, "memory": memory},
         args.json, lines)


if __name__ == "__main__":
    main()
