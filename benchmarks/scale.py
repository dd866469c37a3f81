"""Scale: peak memory and seconds of whole CLI runs against the length of the training stream.

Runs the real CLI (`python -m newllm_kit run … --progress plain`, one process per run) on the
`synthetic` corpus with the `bytes` tokenizer, at each of `--sizes` training-stream lengths, with
a v2-shaped model at a third of v2 A's width (6 layers, gradual reduction, C = E = 256) and a short
schedule (`--iterations` Phase-1 passes, one Phase-2 epoch). Each run is repeated once per context
store (`runner.context_store`) that `newllm-kit validate` accepts; a kit without the key runs once.

Per run: the child's peak RSS (its VmHWM; `os.wait4`'s ru_maxrss without /proc), its peak
`torch.cuda.max_memory_allocated` when it used a GPU, and seconds per phase (`results.jsonl`).
Per store: bytes per training token (least-squares slope of peak RSS on tokens), the time-growth
exponent (slope of log seconds on log tokens), and the per-token memory that predicts for v2 A and
v2 B at 183,620 / 1M / 5M / 10M tokens.

The prediction scales the measured slope by the ratio of per-token widths: the small model is v2 A
at a third of every width, so for A the ratio (6,528 + 768 + 768) / (2,178 + 256 + 256) is the same
whatever the kit holds per token. For B it depends on what is held: every layer output, the token
input and the Phase-1 context (Σ d_j + T + C, a kit without context stores) or one context (C, with
them); the layout used is printed. Fixed costs (weights, optimizer, the process) are not in it.

    python benchmarks/scale.py
    python benchmarks/scale.py --sizes 4000,8000,16000 --json
    python benchmarks/scale.py --stores host --set 'runner.context_dtype="bf16"'
    python benchmarks/scale.py --stores device --malloc system   # glibc's allocator defaults, to compare
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit, machine
from newllm_kit_plugins.cvfp.model import CVFPSettings
from newllm_kit_plugins.data.synthetic import Synthetic, SyntheticSettings

STORES = ("device", "host", "disk")
V2_TOKENS = (183_620, 1_000_000, 5_000_000, 10_000_000)
WORDS_PER_DOC = 100
VAL_DOCS = 8
MODELS = {"small": CVFPSettings(layers=6, context_dim=256, embedding_dim=256),
          "v2 A": CVFPSettings(preset="6L-768"), "v2 B": CVFPSettings(preset="3L-1536")}

CONFIG = """[experiment]
name = "scale"
samples = [{samples}]
seed = 0

[data]
source = "synthetic"
words_per_doc = {words}
docs = {docs}
val = {{ start = {val_start}, count = {val_count} }}

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[solver]
min_iterations = {iterations}
max_iterations = {iterations}

[phase2]
epochs = 1
patience = 1

[runner]
name = "{runner}"

[[models]]
label = "S"
variant = "gradual-reduction"
layers = 6
context_dim = 256
embedding_dim = 256
"""

# The CLI itself, plus a report of its own peaks when the process ends: VmHWM, because the kernel
# folds the parent's peak RSS into a child's ru_maxrss at exec, and the GPU's peak allocation.
CHILD = """
import atexit, json, os, runpy, sys
import torch

def peaks():
    status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
    rss = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with open(os.environ["SCALE_PEAKS"], "w") as handle:
        json.dump({"rss": rss[0] if rss else None, "device": torch.cuda.max_memory_allocated() if cuda else None},
                  handle)

atexit.register(peaks)
sys.argv = ["newllm-kit", *sys.argv[1:]]
runpy.run_module("newllm_kit", run_name="__main__")
"""


def held_widths(settings: CVFPSettings, layout: str) -> int:
    """Floats held per training token: every layer output + token input + Phase-1 context, or one context."""
    if layout == "all layers":
        return sum(settings.layer_widths) + settings.token_width + settings.context_dim
    return settings.context_dim


def rows_for(sizes: list[int]) -> list[int]:
    """The fewest synthetic documents whose bytes reach each size (rows 0…k−1 are the same in every run)."""
    docs = Synthetic(SyntheticSettings(words_per_doc=WORDS_PER_DOC, docs=max(sizes) // (2 * WORDS_PER_DOC) + 64))
    lengths = np.cumsum([len(d[0].encode()) for d in docs.all_documents()])
    if lengths[-1] < max(sizes):
        raise SystemExit(f"scale: {max(sizes)} tokens is beyond the synthetic corpus sized for it")
    return [int(np.searchsorted(lengths, size)) + 1 for size in sizes]


def run_cli(config: Path, out: Path, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One `newllm-kit run`: its peak RSS and device peak in bytes, wall seconds and results record."""
    peak_file = out / "peaks.json"
    sets = [arg for value in overrides for arg in ("--set", value)]
    command = [sys.executable, "-c", CHILD, "run", str(config), "--out", str(out / "runs"), "--progress", "plain",
               *sets]
    env = {**os.environ, **env, "SCALE_PEAKS": str(peak_file)}
    started = time.perf_counter()
    with open(out / "log.txt", "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.perf_counter() - started
    if child.returncode != 0:
        tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"scale: {' '.join(command[3:])} exited {child.returncode}: {' | '.join(tail)}")
    results = next((out / "runs").glob("scale/*/results.jsonl"))
    record = json.loads(results.read_text().splitlines()[-1])
    peaks = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    return {"tokens": record["train_tokens"], "peak_rss": peaks.get("rss") or usage.ru_maxrss * 1024,
            "device_peak": peaks.get("device"),
            "seconds": {**record["seconds"], "wall": wall}, "context_store": record.get("context_store")}


def validates(config: Path, *overrides: str) -> bool:
    sets = [arg for value in overrides for arg in ("--set", value)]
    check = [sys.executable, "-m", "newllm_kit", "validate", str(config), *sets]
    return subprocess.run(check, capture_output=True).returncode == 0


def slope(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y on x."""
    fitted = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return float(fitted[0]), float(fitted[1])


def summarise(runs: list[dict[str, Any]], layout: str) -> dict[str, Any]:
    tokens = [r["tokens"] for r in runs]
    per_token, fixed = slope(tokens, [r["peak_rss"] for r in runs])
    logs = [math.log(t) for t in tokens]
    growth = {phase: slope(logs, [math.log(max(r["seconds"][phase], 1e-9)) for r in runs])[0]
              for phase in runs[0]["seconds"]}
    widths = {name: held_widths(settings, layout) for name, settings in MODELS.items()}
    out: dict[str, Any] = {"bytes_per_token": per_token, "fixed_bytes": fixed, "time_growth_exponent": growth,
                           "layout": layout, "held_floats_per_token": widths,
                           "copies": per_token / (4 * widths["small"])}
    if all(r["device_peak"] is not None for r in runs):
        out["device_bytes_per_token"] = slope(tokens, [r["device_peak"] for r in runs])[0]
    for kind in ("bytes_per_token", "device_bytes_per_token"):
        if kind in out:
            out[f"v2_{kind}"] = {name: out[kind] * widths[name] / widths["small"] for name in ("v2 A", "v2 B")}
    out["predicted_bytes"] = {name: {n: b * n for n in V2_TOKENS} for name, b in out["v2_bytes_per_token"].items()}
    return out


def lines_for(store: str, runs: list[dict[str, Any]], fit: dict[str, Any]) -> list[str]:
    lines = [f"store {store} (per-token layout: {fit['layout']})"]
    for r in runs:
        seconds = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
        device = f", device peak {r['device_peak'] / 1e6:,.0f} MB" if r["device_peak"] is not None else ""
        lines.append(f"  {r['tokens']:>9,} tokens: peak RSS {r['peak_rss'] / 1e6:,.0f} MB{device}; s: {seconds}")
    growth = ", ".join(f"{k} {v:.2f}" for k, v in fit["time_growth_exponent"].items())
    lines.append(f"  bytes per training token (RSS slope): {fit['bytes_per_token']:,.0f} "
                 f"(= {fit['copies']:.2f} × {fit['held_floats_per_token']['small']:,} floats); "
                 f"fixed {fit['fixed_bytes'] / 1e6:,.0f} MB")
    if "device_bytes_per_token" in fit:
        lines.append(f"  device bytes per training token: {fit['device_bytes_per_token']:,.0f}")
    lines.append(f"  time-growth exponent: {growth}")
    for name, predicted in fit["predicted_bytes"].items():
        cells = ", ".join(f"{n:,} → {b / 1e9:,.1f} GB" for n, b in predicted.items())
        lines.append(f"  {name}: {fit['v2_bytes_per_token'][name]:,.0f} B/token: {cells}")
    return lines


def write_configs(root: Path, sizes: list[int], iterations: int, runner: str) -> list[Path]:
    """One experiment file per size; every size shares the corpus and its validation rows."""
    rows = rows_for(sizes)
    root.mkdir(parents=True, exist_ok=True)
    configs = [root / f"{size}.toml" for size in sizes]
    for config, samples in zip(configs, rows, strict=True):
        config.write_text(CONFIG.format(samples=samples, words=WORDS_PER_DOC, docs=rows[-1] + VAL_DOCS,
                                        val_start=rows[-1], val_count=VAL_DOCS, iterations=iterations,
                                        runner=runner))
    return configs


def accepted_stores(config: Path, wanted: list[str], overrides: list[str]) -> list[str]:
    """The context stores of `wanted` that this kit accepts (none before `runner.context_store` existed)."""
    if not validates(config, *overrides):
        raise SystemExit(f"scale: newllm-kit validate refuses {config} with --set {overrides}")
    return [s for s in wanted if validates(config, f'runner.context_store="{s}"', *overrides)]


def sweep(configs: list[Path], root: Path, store: str | None, overrides: list[str], env: dict[str, str]
          ) -> list[dict[str, Any]]:
    """One CLI run per experiment file, with the given context store (None: the kit's default)."""
    settings = [*([f'runner.context_store="{store}"'] if store else []), *overrides]
    runs = []
    for config in configs:
        out = root / (store or "default") / config.stem
        out.mkdir(parents=True, exist_ok=True)
        runs.append(run_cli(config, out, settings, env))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16000,64000,256000", help="training-stream lengths in tokens (≥ 2)")
    parser.add_argument("--stores", default=",".join(STORES), help="context stores to try, when the kit has them")
    parser.add_argument("--iterations", type=int, default=3, help="Phase-1 passes (min = max)")
    parser.add_argument("--runner", default="auto", help="runner.name")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--malloc", choices=("kit", "system"), default="kit",
                        help="kit: large CPU tensors go back to the OS when freed (newllm_kit.allocator); "
                             "system: glibc's defaults (NEWLLM_KIT_MALLOC=system), to compare")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {"NEWLLM_KIT_MALLOC": "system"} if args.malloc == "system" else {}
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) < 2 or sizes[0] < 2:
        parser.error("--sizes needs at least two lengths of 2 tokens or more")
    wanted = args.stores.split(",")
    with tempfile.TemporaryDirectory(prefix="scale-") as temporary:
        root = args.keep or Path(temporary)
        configs = write_configs(root, sizes, args.iterations, args.runner)
        stores = accepted_stores(configs[0], wanted, args.set)
        layout = "one context" if stores else "all layers"
        result: dict[str, Any] = {"machine": machine(), "sizes": sizes, "overrides": args.set, "malloc": args.malloc,
                                  "skipped_stores": [s for s in wanted if s not in stores], "stores": {}}
        lines = [f"machine: {result['machine']}", f"allocator: {args.malloc}"]
        if result["skipped_stores"]:
            lines.append(f"stores not accepted by this kit (skipped): {', '.join(result['skipped_stores'])}")
        choices: list[str | None] = [*stores] or [None]
        for store in choices:
            runs = sweep(configs, root, store, args.set, env)
            fit = summarise(runs, layout)
            result["stores"][store or "default"] = {"runs": runs, **fit}
            lines += lines_for(store or "default", runs, fit)
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
