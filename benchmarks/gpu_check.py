"""GPU smoke lane: pass/fail checks of the kit on one CUDA device; exit 1 when any check fails.

Each check asserts bounds and prints `PASS name: detail`, `FAIL name: why` or `SKIP name: why`, then
a summary line; `--json` prints one object instead (every check's name, status, detail, seconds and
numbers). Whole runs go through the real CLI (`python -m newllm_kit run …` in a subprocess that
reports its own peak RSS, `torch.cuda.max_memory_allocated` and `torch.cuda.host_memory_stats` when it
exits) and use only public settings keys, so the checks follow the kit's behaviour, not its internals.

Checks (bounds are the constants below; CLI runs use experiments/quickstart.toml shrunk by --set):

* solves: frozen solves (sequential, jacobi, chunked, auto) of the contracting v2-A-sized all-layer
  block on CUDA vs the CPU: max |Δ| ≤ SOLVE_MAX_DIFF; `auto` ≥ SOLVE_SPEEDUP × the sequential rollout's
  speed (CUDA only); `auto` alone on a long stream for tokens/s.
* phase1: Phase 1 of v2 A (random iteration 0, no noise), CUDA vs CPU in fp32: per-pass losses within
  PHASE1_LOSS_RTOL, contexts within PHASE1_CONTEXT_DIFF; bf16 losses finite; CUDA ≥ DEVICE_SPEEDUP ×
  the CPU's tokens/s (the last two CUDA only).
* phase2: Phase 2 of v2 A through the real gpu and cpu runners (TF32 off): val losses within
  PHASE2_LOSS_RTOL; a long epoch's positions/s in fp32 and bf16 (bf16 and the speed-up: CUDA only).
* quickstart: the quick-start on the gpu runner (both models, the first size, no seed diagnostics):
  rc 0, a record per unit, val PPL finite and below the vocabulary size.
* stores: a small quick-start unit with `runner.context_store` device, host and disk (fp32) and device
  with `runner.context_dtype = "bf16"`: each completes with the store it asked for; fp32 val PPLs agree
  within STORE_RTOL, bf16 within BF16_STORE_RTOL.
* tf32: the same unit with `runner.tf32` false and true: both finite, the difference reported.
* lm: the Transformer and GRU baselines of experiments/baselines.toml: finite val PPL below the vocabulary.
* kill_resume: the small unit killed (SIGKILL) after its first Phase-2 checkpoint, resumed with the same
  command: results equal the uninterrupted run's within STORE_RTOL; a copy of the killed run resumed
  with CUDA hidden (runner "auto" → cpu) finishes with finite results.
* device_memory: benchmarks/scale.py's runs (v2 A at a third of its width, C = 256) at two stream lengths
  with the device and the host store: growth of max_memory_allocated per training token ≤ (1 + MEMORY_TOL) ×
  (4·C + PER_TOKEN_EXTRA) for device (Phase 1's fp32 buffer, then the store) and ≤ (1 + MEMORY_TOL) ×
  PER_TOKEN_EXTRA for host (README "Large runs": the device keeps ids only). CUDA only; the CPU dry run
  reports the peak-RSS slopes unchecked.
* pinned_host: the longer host-store run's pinned bytes (`host_memory_stats`' allocated_bytes.peak) against
  the planner's figure (`context_store.bytes` in results.jsonl): ≥ the planner's bytes (the store is pinned)
  and ≤ each store's bytes rounded up to a power of two (the pinned allocator's blocks) + PINNED_TOL of the
  planner's bytes + PINNED_SLACK (ids and small tensors that pass through pinned memory). CUDA only.

Expected time on one H100 or H200: about 5 minutes (sized for the 8-minute budget of a GPU job; an
estimate from the sizes, since the lane has not yet run on a GPU). `--device cpu` is a dry run of the
same code path on the CPU with tiny sizes (CUDA-only checks and bounds say SKIP): under 90 s on 2 cores.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --json --keep runs-gpu-check
    python benchmarks/gpu_check.py --only stores,kill_resume
    python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from _common import VOCAB, BenchRunner, QuietProgress, cvfp_model, machine

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "experiments" / "quickstart.toml"
BASELINES = ROOT / "experiments" / "baselines.toml"
METHODS = ("sequential", "jacobi", "chunked", "auto")
CVFP_TABLES = ("solver", "phase2")

# The bounds. fp32 CUDA and CPU kernels sum in different orders: the frozen_solve benchmark puts each
# device's solve of this block within 5e-6 of float64, so 1e-4 between them leaves room and still
# catches a wrong kernel (an error there is O(1)). Phase 1 trains a few Adam steps, whose first steps
# amplify rounding, hence the looser context bound; the losses must still agree closely.
SOLVE_MAX_DIFF = 1e-4
SOLVE_SPEEDUP = 3.0  # the frozen_solve benchmark's target for a contracting block
PHASE1_LOSS_RTOL = 1e-3
PHASE1_CONTEXT_DIFF = 1e-2
PHASE2_LOSS_RTOL = 1e-3
DEVICE_SPEEDUP = 2.0  # CUDA vs the host's CPU on the same v2-A-sized work
STORE_RTOL = 1e-5  # fp32 stores hold the same numbers: only run-to-run rounding may differ
BF16_STORE_RTOL = 0.05  # bf16 stores round each context to 8 bits of mantissa, Phase 2 trains on them
MEMORY_TOL = 0.10
PER_TOKEN_EXTRA = 64  # bytes per training token beyond the contexts: int64 ids, per-token flags
PINNED_TOL = 0.125
PINNED_SLACK = 8 * 2**20

SMALL_RUNNER = {"context_store": "device", "context_dtype": "fp32", "tf32": False}  # the reference run's
STORE_RUNS = {"device": ("device", "fp32"), "host": ("host", "fp32"), "disk": ("disk", "fp32"),
              "bf16": ("device", "bf16")}  # check name: (runner.context_store, runner.context_dtype)


@dataclass(frozen=True)
class Sizes:
    """What each check runs on: the GPU lane's sizes, or the dry run's."""

    solve_tokens: int  # per-method comparison (the CPU side too)
    long_tokens: int  # auto alone, on the device (tokens/s)
    phase1_tokens: int
    passes: int
    phase2_positions: int  # CUDA vs CPU comparison
    phase2_long: int  # throughput epoch, on the device
    memory_tokens: tuple[int, int]
    quickstart_samples: int
    small_samples: int  # the stores / tf32 / kill_resume unit
    small_passes: int  # its Phase-1 passes (min = max)
    small_epochs: int  # its Phase-2 epochs (patience as many: every epoch runs, so a kill lands in Phase 2)
    lm_samples: int
    lm_epochs: int
    run_timeout_s: float  # one CLI run
    # More --set keys per run (the dry run's shorter schedules, fewer validation documents, thinner models).
    quickstart_extra: dict[str, Any] = field(default_factory=dict)
    small_extra: dict[str, Any] = field(default_factory=dict)
    small_model: dict[str, Any] = field(default_factory=dict)
    lm_extra: dict[str, Any] = field(default_factory=dict)
    memory_extra: dict[str, Any] = field(default_factory=dict)


GPU = Sizes(solve_tokens=4096, long_tokens=262144, phase1_tokens=16000, passes=3, phase2_positions=2048,
            phase2_long=65536, memory_tokens=(8000, 32000), quickstart_samples=300, small_samples=200,
            small_passes=8, small_epochs=4, lm_samples=300, lm_epochs=3, run_timeout_s=300)
DRY_RUN = Sizes(solve_tokens=32, long_tokens=128, phase1_tokens=128, passes=2, phase2_positions=64,
                phase2_long=128, memory_tokens=(1000, 2000), quickstart_samples=10, small_samples=10,
                small_passes=2, small_epochs=3, lm_samples=10, lm_epochs=1, run_timeout_s=120,
                quickstart_extra={"solver.min_iterations": 2, "solver.max_iterations": 2, "phase2.epochs": 2,
                                  "data.val.count": 5},
                small_extra={"data.val.count": 5}, small_model={"layers": 2},
                lm_extra={"lm.warmup_steps": 1, "data.val.count": 5},
                memory_extra={"data.val.count": 2, "models.0.layers": 2})


class Skipped(Exception):
    """A check that needs CUDA, on a CPU dry run: reported as SKIP, never as a failure."""


def expect(ok: bool, why: str) -> None:
    """A check's assertion (kept under `python -O`, unlike `assert`)."""
    if not ok:
        raise AssertionError(why)


def finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ---- the check runner ----

Check = Callable[[dict[str, Any]], str]  # fills the numbers it measured, returns the PASS detail


@dataclass
class Outcome:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float
    numbers: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def run_check(name: str, check: Check) -> Outcome:
    """One check: PASS with its detail, SKIP, or FAIL with why; the numbers gathered so far either way."""
    numbers: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        detail, status = check(numbers), "PASS"
    except Skipped as skipped:
        detail, status = str(skipped), "SKIP"
    except AssertionError as failed:
        detail, status = str(failed) or "assertion failed", "FAIL"
    except Exception as error:  # a check that breaks fails too: the lane must not stop at it
        detail, status = f"{type(error).__name__}: {error}", "FAIL"
    return Outcome(name, status, " ".join(detail.split()), time.perf_counter() - started, numbers)


def run_checks(checks: dict[str, Check], as_json: bool, context: dict[str, Any] | None = None) -> int:
    """Every check in order, each line as it finishes (stderr under --json), a summary; 1 if any failed."""
    lines = sys.stderr if as_json else sys.stdout
    started, outcomes = time.perf_counter(), []
    for name, check in checks.items():
        outcomes.append(run_check(name, check))
        print(outcomes[-1].line(), file=lines, flush=True)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "SKIP")}
    total = time.perf_counter() - started
    print(f"{'FAILED' if counts['FAIL'] else 'OK'}: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped of {len(outcomes)} checks in {total:.0f} s", file=lines, flush=True)
    if as_json:
        checks_json = [{**asdict(o), "passed": None if o.status == "SKIP" else o.status == "PASS"} for o in outcomes]
        document = {**(context or {}), "checks": checks_json, "summary": {**counts, "seconds": total}}
        print(json.dumps(strict(document), indent=2, default=str))
    return 1 if counts["FAIL"] else 0


def strict(value: Any) -> Any:
    """`value` with every non-finite float as None: strict JSON, as the kit writes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


# ---- CLI runs ----

# The CLI itself, plus a report of its own peaks when the process ends: VmHWM (the kernel folds the
# parent's peak RSS into a child's ru_maxrss at exec), the device's peak allocation and the pinned
# host allocator's statistics.
CHILD = """
import atexit, json, os, runpy, sys
import torch

def peaks():
    status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
    rss = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    host = dict(torch.cuda.host_memory_stats()) if cuda and hasattr(torch.cuda, "host_memory_stats") else {}
    with open(os.environ.get("GPU_CHECK_PEAKS", os.devnull), "w") as handle:
        json.dump({"rss": rss[0] if rss else None, "device": torch.cuda.max_memory_allocated() if cuda else None,
                   "host": {k: v for k, v in host.items() if isinstance(v, int | float)}}, handle)

atexit.register(peaks)
sys.argv = ["newllm-kit", *sys.argv[1:]]
runpy.run_module("newllm_kit", run_name="__main__")
"""


def toml_value(value: Any) -> str:
    """A TOML value for --set (inline tables for the model lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for these plain names
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def sets(overrides: dict[str, Any]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={toml_value(value)}")]


@dataclass
class CliRun:
    """One `newllm-kit run` under `out`: exit status, where it wrote and what it reported."""

    out: Path  # the --out root
    returncode: int | None  # None: killed by this script
    seconds: float
    log: Path
    peaks: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        found = sorted(p.parent for p in self.out.glob("*/*/config.resolved.toml"))
        expect(len(found) == 1, f"{self.out}: expected one run directory, found {len(found)}")
        return found[0]

    def records(self) -> list[dict[str, Any]]:
        lines = (self.run_dir / "results.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def meta(self) -> dict[str, Any]:
        return dict(json.loads((self.run_dir / "meta.json").read_text()))

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(text[-lines:])

    def finished(self) -> list[dict[str, Any]]:
        """The records of a run that must have exited 0, each with a finite val PPL."""
        expect(self.returncode == 0, f"{self.out.name}: newllm-kit run exited {self.returncode}: {self.tail()}")
        records = self.records()
        expect(bool(records), f"{self.out.name}: no results")
        bad = [r["model"] for r in records if not finite(r.get("val_ppl"))]
        expect(not bad, f"{self.out.name}: val PPL not finite for {bad}")
        return records


class Lane:
    """The device, the sizes, a scratch folder, and the CLI runs: each made once, `jobs` at a time in the
    background, and shared by the checks that read them."""

    def __init__(self, device: str, sizes: Sizes, root: Path, jobs: int) -> None:
        self.device, self.sizes, self.root, self.jobs = device, sizes, root, jobs
        self.cuda = device == "cuda"
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="cli")
        self.runs: dict[str, Future[CliRun]] = {}
        self.started = False

    def close(self) -> None:
        """Drop the runs no check waited for; wait for those already running (their files are in root)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            raise Skipped(f"(no CUDA) {what}")

    # -- running the CLI --

    def command(self, file: Path, out: Path, overrides: dict[str, Any], resume: bool = False) -> list[str]:
        return [sys.executable, "-c", CHILD, "run", str(file), "--out", str(out), "--progress", "plain",
                *(["--resume"] if resume else []), *sets(overrides)]

    def launch(self, tag: str, command: list[str], env: dict[str, str] | None = None
               ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """Start a CLI run, its output in <tag>.log beside its --out root. With several runs at a time each
        gets its share of the cores (every run the same, since results depend on the thread count)."""
        log, peaks = self.root / f"{tag}.log", self.root / f"{tag}.peaks.json"
        peaks.unlink(missing_ok=True)
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.jobs))} if self.jobs > 1 else {}
        environment = {**os.environ, **threads, "NO_COLOR": "1", "GPU_CHECK_PEAKS": str(peaks), **(env or {})}
        with open(log, "ab") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)
        return process, log, peaks

    def _run(self, key: str, command: list[str], out: Path, env: dict[str, str] | None) -> CliRun:
        started = time.perf_counter()
        process, log, peaks = self.launch(key.replace(":", "-"), command, env)
        try:
            returncode: int | None = process.wait(timeout=self.sizes.run_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{out.name}: newllm-kit run took over {self.sizes.run_timeout_s:.0f} s") from None
        report = json.loads(peaks.read_text()) if peaks.exists() else {}
        return CliRun(out, returncode, time.perf_counter() - started, log, report)

    def submit(self, tag: str, file: Path, overrides: dict[str, Any], *, resume: bool = False,
               env: dict[str, str] | None = None) -> Future[CliRun]:
        """One whole run under root/<tag> (or a resume of it), started once per tag."""
        key = f"{tag}:resume" if resume else tag
        if key not in self.runs:
            out = self.root / tag
            self.runs[key] = self.pool.submit(self._run, key, self.command(file, out, overrides, resume), out, env)
        return self.runs[key]

    def cli(self, tag: str, file: Path, overrides: dict[str, Any], *, resume: bool = False,
            env: dict[str, str] | None = None) -> CliRun:
        return self.submit(tag, file, overrides, resume=resume, env=env).result()

    def start(self, checks: list[str]) -> None:
        """Queue every run the given checks read, longest first, once the in-process checks are done (so
        their timings had the machine to themselves)."""
        if self.started:
            return
        self.started = True
        if self.cuda:
            torch.cuda.empty_cache()  # what the in-process checks cached is the children's to use
        if "quickstart" in checks:
            self.quickstart_run()
        if {"device_memory", "pinned_host"} & set(checks):
            self.memory_runs()
        if {"stores", "kill_resume", "tf32"} & set(checks):
            self.small_run()
        if "stores" in checks:
            for kind, dtype in STORE_RUNS.values():
                self.small_run(context_store=kind, context_dtype=dtype)
        if "tf32" in checks and self.cuda:
            self.small_run(tf32=True)
        if "lm" in checks:
            self.lm_run()

    # -- the experiments the checks run --

    def quickstart_run(self) -> Future[CliRun]:
        """The quick-start on the gpu runner: its first size, no seed diagnostics (sequential rollouts that
        change no number); the dry run shortens it further."""
        s = self.sizes
        overrides: dict[str, Any] = {"experiment.samples": [s.quickstart_samples], "solver.val_convergence_trials": 0,
                                     "runner.name": "gpu" if self.cuda else "cpu", **s.quickstart_extra}
        return self.submit("quickstart", QUICKSTART, overrides)

    def small(self, **runner: Any) -> dict[str, Any]:
        """The quick-start's model A alone on `small_samples` documents, every Phase-2 epoch run; runner `auto`
        (so a checkpoint resumes where CUDA is hidden) except in the dry run, fp32 device store and TF32 off
        unless `runner` says otherwise."""
        s = self.sizes
        model = {**tomllib.loads(QUICKSTART.read_text())["models"][0], **s.small_model}
        overrides: dict[str, Any] = {
            "experiment.samples": [s.small_samples], "models": [model], "solver.val_convergence_trials": 0,
            "solver.min_iterations": s.small_passes, "solver.max_iterations": s.small_passes,
            "phase2.epochs": s.small_epochs, "phase2.patience": s.small_epochs,
            "runner.name": "auto" if self.cuda else "cpu", **s.small_extra}
        overrides.update({f"runner.{key}": value for key, value in {**SMALL_RUNNER, **runner}.items()})
        return overrides

    def small_run(self, **runner: Any) -> Future[CliRun]:
        """The small unit's run with these runner keys (the defaults name the reference run)."""
        changed = {k: v for k, v in sorted(runner.items()) if SMALL_RUNNER.get(k) != v}
        tag = "small" + "".join(f"-{k}-{v}" for k, v in changed.items())
        return self.submit(tag.lower(), QUICKSTART, self.small(**changed))

    def lm_run(self) -> Future[CliRun]:
        """experiments/baselines.toml without its CVFP models and their recipe's tables (the kit refuses a
        table no model uses), its learning-rate sweep and its extra seeds: the Transformer and the GRU on
        the quick-start's data, one unit each."""
        s = self.sizes
        experiment = tomllib.loads(BASELINES.read_text())
        models = [m for m in experiment["models"] if m.get("architecture") in ("transformer", "gru")]
        file = self.root / "lm.toml"
        if not file.exists():
            kept = {k: v for k, v in experiment.items() if k not in (*CVFP_TABLES, "sweep")}
            kept["experiment"] = {k: v for k, v in kept["experiment"].items() if k != "seeds"}
            file.write_text(tomli_w.dumps({**kept, "models": models}))
        overrides: dict[str, Any] = {"experiment.samples": [s.lm_samples], "lm.epochs": s.lm_epochs,
                                     "lm.patience": s.lm_epochs, "runner.name": "gpu" if self.cuda else "cpu",
                                     **s.lm_extra}
        return self.submit("lm", file, overrides)

    def memory_runs(self) -> dict[str, list[Future[CliRun]]]:
        """benchmarks/scale.py's runs at both memory lengths, per store (on the CPU host and device are the
        same memory: device only), Phase-1 chunks no longer than the shorter stream so that only the
        stream grows between the two, and no seed diagnostics."""
        import scale

        lengths = list(self.sizes.memory_tokens)
        folder = self.root / "memory-configs"
        configs = [folder / f"{n}.toml" for n in lengths]
        if not all(c.exists() for c in configs):
            configs = scale.write_configs(folder, lengths, iterations=2, runner="gpu" if self.cuda else "cpu")
        overrides = {"solver.batch_size": min(min(lengths), 8000), "solver.val_convergence_trials": 0,
                     **self.sizes.memory_extra}
        return {store: [self.submit(f"memory-{store}-{c.stem}", c, {"runner.context_store": store, **overrides})
                        for c in configs]
                for store in (("device", "host") if self.cuda else ("device",))}


# ---- in-process checks: the solves and both phases on the device against the CPU ----

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_ids(n: int, device: str) -> torch.Tensor:
    """n seeded GPT-2 ids: the same stream on every device."""
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0)).to(device)


def timed_solve(model: Any, device: str, tokens: int, method: str) -> tuple[list[torch.Tensor], str, float]:
    from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver

    stream = random_ids(tokens, device)
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve=method))
    if device == "cuda":
        solver.solve(model, stream[: min(tokens, 256)], BenchRunner(device))  # warm-up (kernels, allocator)
        sync(device)
    started = time.perf_counter()
    result = solver.solve(model, stream, BenchRunner(device))
    sync(device)
    return [h.cpu() for h in result.layers], result.method, time.perf_counter() - started


def check_solves(lane: Lane, numbers: dict[str, Any]) -> str:
    """The all-layer block (ρ ≈ 0.49 at random init): every method converges, so all must agree."""
    s = lane.sizes
    model = cvfp_model("A-every", device=lane.device)
    cpu_model = cvfp_model("A-every") if lane.cuda else model
    for method in METHODS:
        on_device, resolved, seconds = timed_solve(model, lane.device, s.solve_tokens, method)
        # The dry run compares the CPU with itself: the same numbers, computed once.
        on_cpu, _, cpu_seconds = (timed_solve(cpu_model, "cpu", s.solve_tokens, method) if lane.cuda
                                  else (on_device, resolved, seconds))
        diff = max((a - b).abs().max().item() for a, b in zip(on_device, on_cpu, strict=True))
        numbers[method] = {"resolved": resolved, "max_abs_diff_vs_cpu": diff, "seconds": seconds,
                           "tokens_per_s": s.solve_tokens / seconds, "cpu_seconds": cpu_seconds}
    _, resolved, seconds = timed_solve(model, lane.device, s.long_tokens, "auto")
    numbers["auto_long"] = {"tokens": s.long_tokens, "resolved": resolved, "tokens_per_s": s.long_tokens / seconds}
    worst = max(numbers[m]["max_abs_diff_vs_cpu"] for m in METHODS)
    speedup = numbers["sequential"]["seconds"] / numbers["auto"]["seconds"]
    numbers.update(max_abs_diff_vs_cpu=worst, auto_vs_sequential=speedup)
    expect(worst <= SOLVE_MAX_DIFF, f"max |{lane.device} − cpu| {worst:.2e} > {SOLVE_MAX_DIFF:g}")
    if lane.cuda:
        expect(speedup >= SOLVE_SPEEDUP, f"auto {speedup:.2f}× the sequential rollout's speed < {SOLVE_SPEEDUP:g}×")
    bound = f"≥ {SOLVE_SPEEDUP:g}×" if lane.cuda else "bound on CUDA only"
    return (f"max |{lane.device} − cpu| {worst:.1e} ≤ {SOLVE_MAX_DIFF:g} over {', '.join(METHODS)} "
            f"({s.solve_tokens:,} tokens); auto {speedup:.1f}× sequential ({bound}); auto on "
            f"{s.long_tokens:,} tokens: {numbers['auto_long']['tokens_per_s']:,.0f} tokens/s")


def phase1_fit(device: str, precision: str, tokens: int, passes: int) -> dict[str, Any]:
    """Phase 1 of v2 A from the same random iteration 0 without noise: both devices see the same inputs."""
    from newllm_kit_plugins.cvfp.model import context_flops_per_token
    from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver

    model = cvfp_model("A", device=device)
    stream = random_ids(tokens, device)
    settings = CVFPPhase1Settings(init="random", context_noise=0.0, max_iterations=passes + 1,
                                  min_iterations=passes + 1)
    torch.manual_seed(1)
    sync(device)
    report = CVFPPhase1Solver(settings).fit(model, stream, BenchRunner(device, precision), QuietProgress())
    sync(device)
    seconds = min(h["seconds"] for h in report.history)
    return {"contexts": report.contexts.cpu(), "losses": [h["loss"] for h in report.history],
            "pass_seconds": seconds, "tokens_per_s": tokens / seconds,
            "tflops": context_flops_per_token(model) * 3 * tokens / seconds / 1e12}


def check_phase1(lane: Lane, numbers: dict[str, Any]) -> str:
    s = lane.sizes
    device = phase1_fit(lane.device, "fp32", s.phase1_tokens, s.passes)
    cpu = phase1_fit("cpu", "fp32", s.phase1_tokens, s.passes) if lane.cuda else dict(device)  # dry run: itself
    diff = (device.pop("contexts") - cpu.pop("contexts")).abs().max().item()
    loss_rtol = max(relative(a, b) for a, b in zip(device["losses"], cpu["losses"], strict=True))
    numbers.update(fp32=device, cpu=cpu, max_abs_diff_contexts=diff, max_rel_diff_losses=loss_rtol)
    expect(finite(*device["losses"], *cpu["losses"]), f"non-finite losses: {device['losses']} / {cpu['losses']}")
    expect(loss_rtol <= PHASE1_LOSS_RTOL, f"losses differ by {loss_rtol:.2e} (relative) > {PHASE1_LOSS_RTOL:g}")
    expect(diff <= PHASE1_CONTEXT_DIFF, f"max |Δ contexts| {diff:.2e} > {PHASE1_CONTEXT_DIFF:g}")
    detail = (f"{s.passes} passes on {s.phase1_tokens:,} tokens, {lane.device} vs cpu: losses within {loss_rtol:.1e}, "
              f"max |Δ contexts| {diff:.1e}")
    if not lane.cuda:
        return detail + "; bf16 and the speed-up on CUDA only"
    bf16 = phase1_fit(lane.device, "bf16", s.phase1_tokens, s.passes)
    bf16.pop("contexts")
    speedup = device["tokens_per_s"] / cpu["tokens_per_s"]
    numbers.update(bf16=bf16, speedup_vs_cpu=speedup)
    expect(finite(*bf16["losses"]), f"bf16 losses not finite: {bf16['losses']}")
    expect(speedup >= DEVICE_SPEEDUP, f"cuda only {speedup:.1f}× the CPU's tokens/s < {DEVICE_SPEEDUP:g}×")
    return (detail + f"; {device['tflops']:.1f} TFLOP/s fp32, {bf16['tflops']:.1f} bf16, {speedup:.0f}× the CPU "
            f"(≥ {DEVICE_SPEEDUP:g}×)")


def check_phase2(lane: Lane, numbers: dict[str, Any]) -> str:
    """Phase 2 of v2 A through the real runners: 2 epochs on the device (TF32 off) vs the CPU from the same
    weights and data, then one long epoch per precision on the device for positions/s."""
    import phase2 as bench  # benchmarks/phase2.py: the model and random-context streams it times
    from newllm_kit_plugins.cvfp.frozen_solve import full_precision_matmuls
    from newllm_kit_plugins.cvfp.phase2 import Phase2Settings, train_phase2
    from newllm_kit_plugins.runners.local import CPURunner, GPURunner, RunnerSettings

    def run(device: str, precision: str, n: int, epochs: int, tf32: bool = True) -> tuple[Any, Any, float]:
        runner = (GPURunner if device == "cuda" else CPURunner)(RunnerSettings(precision=precision, tf32=tf32))
        runner.setup()
        try:
            model = bench.build(torch.device(device))
            train = bench.stream(model, n, 1, torch.device(device))
            val = bench.stream(model, max(n // 8, 64), 2, torch.device(device))
            settings = Phase2Settings(epochs=epochs, patience=epochs, batch_size=1024, restore_best=False)
            sync(device)
            started = time.perf_counter()
            report = train_phase2(model, train, val, settings, runner, QuietProgress())
            sync(device)
            return model, report, time.perf_counter() - started
        finally:
            runner.teardown()

    s = lane.sizes
    with full_precision_matmuls():
        if lane.cuda:
            run(lane.device, "fp32", min(1024, s.phase2_positions), 1, tf32=False)  # warm-up: kernels, allocator
        _, on_device, device_seconds = run(lane.device, "fp32", s.phase2_positions, 2, tf32=False)
        _, on_cpu, cpu_seconds = (run("cpu", "fp32", s.phase2_positions, 2, tf32=False) if lane.cuda
                                  else (None, on_device, device_seconds))  # the dry run: itself
    losses = [(d["val_loss"], c["val_loss"]) for d, c in zip(on_device.history, on_cpu.history, strict=True)]
    worst = max(relative(d, c) for d, c in losses)
    numbers.update(positions=s.phase2_positions, val_losses_device_cpu=losses, max_rel_diff_val_loss=worst)
    expect(finite(*(x for pair in losses for x in pair)), f"non-finite val losses: {losses}")
    expect(worst <= PHASE2_LOSS_RTOL, f"val losses differ by {worst:.2e} (relative) > {PHASE2_LOSS_RTOL:g}")
    detail = f"2 epochs on {s.phase2_positions:,} positions, {lane.device} vs cpu: val losses within {worst:.1e}"
    precisions = ("fp32", "bf16") if lane.cuda else ("fp32",)  # bf16 on a CPU without bf16 units: minutes
    for precision in precisions:
        if lane.cuda:
            run(lane.device, precision, min(4096, s.phase2_long), 1)  # warm-up: kernels, allocator
        _, report, seconds = run(lane.device, precision, s.phase2_long, 1)
        numbers[precision] = {"positions": s.phase2_long, "epoch_seconds": seconds,
                              "positions_per_s": s.phase2_long / seconds, "val_loss": report.history[-1]["val_loss"]}
        expect(finite(numbers[precision]["val_loss"]), f"{precision} epoch: val loss not finite")
    rates = ", ".join(f"{p} {numbers[p]['positions_per_s']:,.0f}" for p in precisions)
    if not lane.cuda:
        return detail + f"; positions/s: {rates}; bf16 and the speed-up on CUDA only"
    speedup = cpu_seconds / device_seconds
    numbers["speedup_vs_cpu"] = speedup
    expect(speedup >= DEVICE_SPEEDUP, f"cuda only {speedup:.1f}× the CPU's speed < {DEVICE_SPEEDUP:g}×")
    return detail + f"; positions/s: {rates} (TF32 on); {speedup:.0f}× the CPU (≥ {DEVICE_SPEEDUP:g}×)"


# ---- CLI checks: whole runs of the kit ----

def vocabulary(file: Path) -> int:
    return int(tomllib.loads(file.read_text())["tokenizer"]["vocab_size"])


def labels(records: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{r['model']}-{r['samples']}": r["val_ppl"] for r in records}


def resolved_runner(run: CliRun) -> str | None:
    runner = run.meta().get("runner")
    return runner.get("resolved") if isinstance(runner, dict) else None


def check_quickstart(lane: Lane, numbers: dict[str, Any]) -> str:
    run = lane.quickstart_run().result()
    records = run.finished()
    models = [m["label"] for m in tomllib.loads(QUICKSTART.read_text())["models"]]
    vocab, where = vocabulary(QUICKSTART), resolved_runner(run)
    numbers.update(val_ppl=labels(records), seconds=run.seconds, runner=where, device_peak=run.peaks.get("device"))
    expect(sorted(r["model"] for r in records) == sorted(models), f"units {list(labels(records))}, models {models}")
    expect(all(r["val_ppl"] < vocab for r in records), f"val PPL {labels(records)} not below the vocabulary ({vocab})")
    expect(where == ("gpu" if lane.cuda else "cpu"), f"meta.json says the run used {where!r}")
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in labels(records).items())
    return f"{len(records)} units on {where} in {run.seconds:.0f} s, val PPL {ppl} (< {vocab})"


def check_stores(lane: Lane, numbers: dict[str, Any]) -> str:
    ppl = {}
    for name, (kind, dtype) in STORE_RUNS.items():
        run = lane.small_run(context_store=kind, context_dtype=dtype).result()
        record = run.finished()[0]
        plan = record.get("context_store") or {}
        ppl[name] = record["val_ppl"]
        numbers[name] = {"val_ppl": ppl[name], "context_store": plan, "seconds": run.seconds,
                         "device_peak": run.peaks.get("device"), "peak_rss": run.peaks.get("rss")}
        expect((plan.get("kind"), plan.get("dtype")) == (kind, dtype), f"{name}: the run's store was {plan}")
        where = resolved_runner(run)
        expect(where == ("gpu" if lane.cuda else "cpu"), f"{name}: meta.json says the run used {where!r}")
    fp32 = max(relative(ppl[k], ppl["device"]) for k in ("host", "disk"))
    bf16 = relative(ppl["bf16"], ppl["device"])
    numbers.update(max_rel_diff_fp32=fp32, rel_diff_bf16=bf16)
    expect(fp32 <= STORE_RTOL, f"fp32 stores' val PPL {ppl} differ by {fp32:.2e} (relative) > {STORE_RTOL:g}")
    expect(bf16 <= BF16_STORE_RTOL, f"bf16 store's val PPL {ppl['bf16']:.4f} is {bf16:.2%} from fp32's "
                                    f"{ppl['device']:.4f} > {BF16_STORE_RTOL:.0%}")
    return (f"val PPL device {ppl['device']:.4f}, host and disk within {fp32:.1e} (≤ {STORE_RTOL:g}), "
            f"bf16 {ppl['bf16']:.4f} ({bf16:.2%}, ≤ {BF16_STORE_RTOL:.0%})")


def check_tf32(lane: Lane, numbers: dict[str, Any]) -> str:
    lane.need_cuda("runner.tf32 switches CUDA's TF32 matmuls")
    off, on = (lane.small_run(tf32=tf32).result().finished()[0]["val_ppl"] for tf32 in (False, True))
    numbers.update(fp32_val_ppl=off, tf32_val_ppl=on, rel_diff=relative(on, off))
    return f"Phase 2 val PPL fp32 {off:.4f}, TF32 {on:.4f}: {relative(on, off):.2%} apart (reported, not bounded)"


def check_lm(lane: Lane, numbers: dict[str, Any]) -> str:
    run = lane.lm_run().result()
    models = [m for m in tomllib.loads(BASELINES.read_text())["models"]
              if m.get("architecture") in ("transformer", "gru")]
    records = run.finished()
    vocab = vocabulary(BASELINES)
    numbers.update(val_ppl=labels(records), seconds=run.seconds, device_peak=run.peaks.get("device"))
    expect(sorted(r["model"] for r in records) == sorted(m["label"] for m in models), f"units {list(labels(records))}")
    expect(all(r["val_ppl"] < vocab for r in records), f"val PPL {labels(records)} not below the vocabulary ({vocab})")
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in labels(records).items())
    return f"{ppl} (< {vocab}) in {run.seconds:.0f} s"


EQUAL_KEYS = ("model", "samples", "train_tokens", "val_tokens", "phase1_iterations", "best_epoch", "epochs_run")
CLOSE_KEYS = ("val_ppl", "val_acc", "val_er", "train_er", "convergence_rate")


def records_diff(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float:
    """The largest relative difference of the compared numbers; any difference in counts fails."""
    expect(len(records) == len(reference), f"{len(records)} records vs {len(reference)}")
    worst = 0.0
    for mine, theirs in zip(records, reference, strict=True):
        for key in EQUAL_KEYS:
            expect(mine.get(key) == theirs.get(key), f"{mine.get('model')}: {key} {mine.get(key)} vs {theirs.get(key)}")
        worst = max([worst, *(relative(mine[k], theirs[k]) for k in CLOSE_KEYS if finite(mine.get(k), theirs.get(k)))])
    return worst


def phase2_checkpointed(out: Path) -> bool:
    """A unit has published a Phase-2 checkpoint (`checkpoints/<unit>/LATEST` names a phase2-… folder)."""
    for pointer in out.glob("*/*/checkpoints/*/LATEST"):
        try:
            if pointer.read_text().startswith("phase2"):
                return True
        except OSError:
            continue
    return False


def check_kill_resume(lane: Lane, numbers: dict[str, Any]) -> str:
    s, overrides = lane.sizes, lane.small()
    reference = lane.small_run().result().finished()
    killed_out, copy_out = lane.root / "killed", lane.root / "killed-cpu"
    started = time.perf_counter()
    process, log, _ = lane.launch("killed", lane.command(QUICKSTART, killed_out, overrides))
    killed = False
    while time.perf_counter() - started < s.run_timeout_s and process.poll() is None:
        if phase2_checkpointed(killed_out):
            os.kill(process.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    if process.poll() is None and not killed:
        process.kill()
    returncode = process.wait()
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-2:])
    expect(killed, f"the run ended (rc {returncode}) before a Phase-2 checkpoint could be killed: {tail}")
    killed_run = CliRun(killed_out, None, time.perf_counter() - started, log, {})
    status = killed_run.meta().get("status")
    numbers.update(killed_after_s=killed_run.seconds, status_after_kill=status)
    expect(status == "running", f"meta.json status after kill -9 is {status!r}, not 'running'")
    shutil.copytree(killed_out, copy_out, symlinks=True)  # the same GPU checkpoint, for the CPU to resume

    hidden = {"CUDA_VISIBLE_DEVICES": ""}  # runner "auto" then resolves to the cpu, with the same settings
    resuming, resuming_on_cpu = (lane.submit("killed", QUICKSTART, overrides, resume=True),
                                 lane.submit("killed-cpu", QUICKSTART, overrides, resume=True, env=hidden))
    resumed = resuming.result()
    records = resumed.finished()
    expect("resumed from checkpoint" in resumed.log.read_text(errors="replace"), "the resume did not say "
           "'resumed from checkpoint'")
    same = records_diff(records, reference)
    numbers.update(val_ppl=labels(records), reference_val_ppl=labels(reference), max_rel_diff=same)
    expect(same <= STORE_RTOL, f"resumed results differ from the uninterrupted run's by {same:.2e} > {STORE_RTOL:g}")

    on_cpu = resuming_on_cpu.result()
    cpu_records = on_cpu.finished()
    where = resolved_runner(on_cpu)
    cpu_diff = relative(cpu_records[0]["val_ppl"], reference[0]["val_ppl"])
    numbers.update(cpu_resume={"runner": where, "val_ppl": labels(cpu_records), "rel_diff_vs_reference": cpu_diff})
    expect(where == "cpu", f"the resume with CUDA hidden ran on {where!r}")
    expect("resumed from checkpoint" in on_cpu.log.read_text(errors="replace"), "the CPU resume started over")
    return (f"killed in Phase 2 ({killed_run.seconds:.0f} s after its start), resumed: results within {same:.1e} "
            f"of the uninterrupted run (≤ {STORE_RTOL:g}); the {'GPU ' if lane.cuda else ''}checkpoint resumed on the "
            f"cpu: val PPL {cpu_records[0]['val_ppl']:.4f} ({cpu_diff:.2%} from the uninterrupted run, reported)")


def slope(x: list[int], y: list[int | None]) -> float | None:
    """Growth of y per unit of x between the first and the last point; None when a y is missing."""
    first, last = y[0], y[-1]
    return None if first is None or last is None else (last - first) / (x[-1] - x[0])


def power_of_two(n: float) -> int:
    return 1 << max(math.ceil(n) - 1, 0).bit_length()


def check_device_memory(lane: Lane, numbers: dict[str, Any]) -> str:
    runs = {store: [future.result() for future in futures] for store, futures in lane.memory_runs().items()}
    width = int(tomllib.loads((runs["device"][0].run_dir / "config.resolved.toml").read_text())["models"][0]
                ["context_dim"])
    bounds = {"device": (1 + MEMORY_TOL) * (4 * width + PER_TOKEN_EXTRA), "host": (1 + MEMORY_TOL) * PER_TOKEN_EXTRA}
    for store, store_runs in runs.items():
        tokens = [run.finished()[0]["train_tokens"] for run in store_runs]
        rss, device = [run.peaks.get("rss") for run in store_runs], [run.peaks.get("device") for run in store_runs]
        numbers[store] = {"tokens": tokens, "peak_rss": rss, "device_peak": device, "bound": bounds[store],
                          "rss_bytes_per_token": slope(tokens, rss), "device_bytes_per_token": slope(tokens, device)}
    if not lane.cuda:
        rates = ", ".join(f"{k} {v['rss_bytes_per_token']:,.0f}" for k, v in numbers.items()
                          if v["rss_bytes_per_token"] is not None)
        return (f"runs at {numbers['device']['tokens']} tokens finished; peak RSS B/token {rates} (the device-memory "
                "bounds on CUDA only)")
    for store in runs:
        rate = numbers[store]["device_bytes_per_token"]
        expect(rate is not None, f"{store}: the runs reported no device peak")
        expect(rate <= bounds[store], f"{store} store: device memory grows {rate:,.0f} B per training token > "
                                      f"{bounds[store]:,.0f} (C = {width})")
    return ", ".join(f"{store} store {numbers[store]['device_bytes_per_token']:,.0f} B/token (≤ {bounds[store]:,.0f})"
                     for store in runs) + f"; C = {width}, {numbers['device']['tokens']} tokens"


def check_pinned_host(lane: Lane, numbers: dict[str, Any]) -> str:
    lane.need_cuda("torch.cuda.host_memory_stats counts CUDA's pinned allocator")
    run = lane.memory_runs()["host"][-1].result()
    record = run.finished()[0]
    plan = record.get("context_store") or {}
    expect(plan.get("kind") == "host", f"the run's store was {plan}")
    stats = run.peaks.get("host") or {}
    key = next((k for k in ("allocated_bytes.peak", "reserved_bytes.peak") if k in stats), None)
    expect(key is not None, f"host_memory_stats has no peak bytes: {sorted(stats)}")
    pinned, planned = int(stats[str(key)]), int(plan["bytes"])
    rows = {"train": record["train_tokens"], "val": record["val_tokens"]}
    rounded = sum(power_of_two(planned * n / sum(rows.values())) for n in rows.values())
    bound = rounded + PINNED_TOL * planned + PINNED_SLACK
    numbers.update(pinned_peak=pinned, statistic=key, planned_bytes=planned, rounded_bytes=rounded, bound=bound,
                   tokens=rows)
    expect(pinned >= planned, f"{pinned:,} pinned bytes < the planner's {planned:,}: the host store is not pinned")
    expect(pinned <= bound, f"{pinned:,} pinned bytes > {bound:,.0f} (stores rounded to powers of two {rounded:,}, "
                            f"+{PINNED_TOL:.1%} of the planner's {planned:,}, +{PINNED_SLACK // 2**20} MiB)")
    mib = 2**20
    return (f"pinned peak {pinned / mib:,.1f} MiB for the planner's {planned / mib:,.1f} MiB "
            f"(≤ {bound / mib:,.1f} MiB) at {rows['train']:,} training tokens")


CHECKS: dict[str, Callable[[Lane, dict[str, Any]], str]] = {
    "solves": check_solves, "phase1": check_phase1, "phase2": check_phase2, "quickstart": check_quickstart,
    "stores": check_stores, "tf32": check_tf32, "lm": check_lm, "kill_resume": check_kill_resume,
    "device_memory": check_device_memory, "pinned_host": check_pinned_host}


IN_PROCESS = ("solves", "phase1", "phase2")  # timed in this process: they run before any CLI run starts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the same code path with tiny sizes")
    parser.add_argument("--only", help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="CLI runs at a time (default: 4, or the number of cores when fewer)")
    parser.add_argument("--keep", type=Path, help="keep the CLI runs and their logs in this new or empty folder")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout (check lines on stderr)")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in wanted if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder is not empty")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: CUDA is not available on this machine (torch {torch.__version__}); nothing to "
                 "check. Use --device cpu for a dry run.")
    names = [n for n in CHECKS if n in wanted]
    sizes = GPU if args.device == "cuda" else DRY_RUN
    bounds = ("SOLVE_MAX_DIFF", "SOLVE_SPEEDUP", "PHASE1_LOSS_RTOL", "PHASE1_CONTEXT_DIFF", "PHASE2_LOSS_RTOL",
              "DEVICE_SPEEDUP", "STORE_RTOL", "BF16_STORE_RTOL", "MEMORY_TOL", "PER_TOKEN_EXTRA", "PINNED_TOL",
              "PINNED_SLACK")
    context = {"machine": machine(), "device": args.device, "jobs": args.jobs, "sizes": asdict(sizes),
               "bounds": {name: globals()[name] for name in bounds}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        root = args.keep or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        lane = Lane(args.device, sizes, root.resolve(), args.jobs)

        def bound(name: str) -> Check:
            def check(numbers: dict[str, Any]) -> str:
                if name not in IN_PROCESS:
                    lane.start(names)
                return CHECKS[name](lane, numbers)
            return check

        if not lane.cuda:  # nothing is timed in the dry run: the CLI runs overlap the in-process checks,
            torch.set_num_threads(1)  # one thread each, as oversubscribed torch threads crawl
            lane.start(names)
        try:
            code = run_checks({name: bound(name) for name in names}, args.json, context)
        finally:
            lane.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
