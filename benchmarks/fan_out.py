"""A grid on two local workers against the same grid in one process: wall time and numbers.

The grid: 4 units (2 models × 2 seeds, one training size), each a cvfp unit of tens of seconds on
one core. It runs twice through the real CLI, side by side in one invocation:
`newllm-kit run FILE --set runner.threads=1` (sequential, one thread) and
`newllm-kit run FILE --set runner.threads=1 --launcher pool --jobs 2` (two worker processes, one
thread each). It reports both wall times, their ratio, the per-unit startup a job pays (a fresh
interpreter, torch, the plugins and the token cache), and whether every number of results.jsonl
except the seconds is the same.

    python benchmarks/fan_out.py              # ~4 minutes on 2 cores
    python benchmarks/fan_out.py --samples 150 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[experiment]
name = "fan-out"
samples = [{samples}]
seeds = [1, 2]

[data]
source = "synthetic"
words_per_doc = 100
docs = 1200
val = {{ start = 1100, count = 40 }}

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[solver]
name = "cvfp"
max_iterations = 4
val_convergence_trials = 2

[phase2]
epochs = 4
patience = 4
batch_size = 512

[runner]
name = "cpu"

[[models]]
label = "A"
variant = "gradual-reduction"
layers = 3
context_dim = 64
embedding_dim = 64

[[models]]
label = "B"
variant = "token-every-layer"
layers = 2
context_dim = 64
embedding_dim = 64
"""


def run(config: Path, out: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "newllm_kit", "run", str(config), "--set", "runner.threads=1",
                           "--out", str(out), "--progress", "none", *extra], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def numbers(out: Path) -> list[dict[str, Any]]:
    (results,) = out.glob("*/*/results.jsonl")
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in results.read_text().splitlines()]


def startup_s() -> float:
    """What a job pays before its unit computes: a fresh interpreter importing the kit and its plugins."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "newllm_kit", "plugins", "--json"], cwd=ROOT, capture_output=True,
                   check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="documents per unit (sets the unit's length)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        config = base / "fan-out.toml"
        config.write_text(CONFIG.format(samples=args.samples))
        sequential_s = run(config, base / "sequential", [])
        pool_s = run(config, base / "pool", ["--launcher", "pool", "--jobs", "2"])
        same = numbers(base / "sequential") == numbers(base / "pool")
        units = [round(r["seconds"]["unit"], 1) for r in
                 (json.loads(line) for line in next((base / "sequential").glob("*/*/results.jsonl")).read_text()
                  .splitlines())]
        start = startup_s()
    speedup = sequential_s / pool_s
    result = {"benchmark": "fan_out", "machine": machine(), "units": 4, "unit_seconds": units,
              "sequential_s": round(sequential_s, 1), "pool_2_jobs_s": round(pool_s, 1),
              "speedup": round(speedup, 2), "job_startup_s": round(start, 1), "same_numbers": same,
              "target": "speedup >= 1.6 with the same numbers", "met": speedup >= 1.6 and same}
    lines = [f"4-unit grid, units of {', '.join(map(str, units))} s on one thread",
             f"sequential (1 process, 1 thread):  {sequential_s:6.1f} s",
             f"pool --jobs 2 (1 thread each):     {pool_s:6.1f} s   → {speedup:.2f}× (target ≥ 1.6×)",
             f"a job's startup (interpreter, torch, plugins): {start:.1f} s",
             f"same numbers in results.jsonl (all but seconds): {same}"]
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
