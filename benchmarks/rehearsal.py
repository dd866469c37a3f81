"""Rehearsal: the seed's next scale on this CPU, one process against two gloo ranks, and a killed rank resumed.

Runs the real CLI on the `synthetic` corpus (`bytes` tokenizer, random frozen embedding: no GPT-2
download) at `--tokens` training tokens with v2 A's shape at a reduced width (6 layers, gradual
reduction, C = E = `--width`) and v2's solver and Phase-2 settings, shortened: `--passes` Phase-1
passes, `--epochs` Phase-2 epochs, `--trials` validation convergence trials. Every process runs one
torch thread, so one process and two ranks use the same arithmetic.

1. One process (`python -m newllm_kit run`): wall seconds, peak RSS (its VmHWM, polled).
2. `torchrun --nproc_per_node=2` with `runner.name = "ddp"` (gloo) and `runner.timeout_s = --timeout`:
   whether it completes (or times out), and each rank's `ddp rank r/2:` line (the runner prints it
   at teardown): peak RSS, seconds per phase, collectives and the time spent waiting in them.
3. The same job in a fresh folder, killed (SIGKILL to torchrun and to each worker's process group:
   torchrun starts the workers in sessions of their own) as soon as rank 0 prints `<unit> phase2:
   start`, then resumed with `--resume`: its wall seconds against the uninterrupted job's seconds
   from that line to its end.
4. The same two runs (one process, two ranks) at `--baseline-tokens`: the fixed part of the memory.

Report, against the issue's targets: per-rank stream memory (peak RSS less the same process's at
the baseline size) ÷ the one process's (≤ 0.55); collective waiting and seconds per phase per rank
and their spread, (slowest − fastest) ÷ fastest (≤ 10 %); resume ÷ remaining (≤ 1.2); and whether
results.jsonl's numbers agree between one process, ddp and resumed ddp (exactly, and the largest
relative difference).

    python benchmarks/rehearsal.py                                  # 1M tokens: hours on 2 cores
    python benchmarks/rehearsal.py --tokens 40000 --chunk 4000 --json --keep /tmp/rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from _common import emit, machine
from newllm_kit_plugins.runners.ddp import parse_timings_line
from scale import WORDS_PER_DOC, rows_for

ROOT = Path(__file__).resolve().parent.parent
VAL_DOCS = 50  # v2 validates on 50 rows
TARGETS = {"stream_ratio": 0.55, "phase_spread": 0.10, "resume_ratio": 1.2}
MIN_STREAM = 64 * 2**20  # below this the one process's stream part is within the noise of two peak RSS readings
MIN_PHASE_SHARE, MIN_PHASE_S = 0.1, 5.0  # shorter phases are listed, not judged: their spread is noise
PHASE2_START = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+ phase2: start")
TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
HEADLINE = ("val_ppl", "val_acc", "val_er", "train_er", "convergence_rate")
# Numbers of a results row that differ between runners by design, or are not results.
NOT_COMPARED = ("seconds", "phase1_token_evaluations", "context_store")

CONFIG = """[experiment]
name = "rehearsal"
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
freeze = true

[solver]
name = "cvfp"
init = "rollout"
min_iterations = {passes}
max_iterations = {passes}
batch_size = {chunk}
learning_rate = 0.002
context_noise = 0.1
dist_reg_weight = 0.5
convergence_threshold = 0.03
min_converged_ratio = 0.95
val_convergence_trials = {trials}

[phase2]
epochs = {epochs}
patience = 1
learning_rate = 0.001
batch_size = 1024

[runner]
name = "cpu"

[[models]]
label = "A"
architecture = "cvfp"
variant = "gradual-reduction"
layers = 6
context_dim = {width}
embedding_dim = {width}
num_input_tokens = 1
"""


def write_configs(root: Path, tokens: list[int], args: argparse.Namespace) -> list[Path]:
    """One experiment file per size, sharing the corpus and the validation rows after the longest stream."""
    rows = rows_for(tokens)
    root.mkdir(parents=True, exist_ok=True)
    last = max(rows)
    paths = []
    for size, samples in zip(tokens, rows, strict=True):
        path = root / f"{size}.toml"
        path.write_text(CONFIG.format(samples=samples, words=WORDS_PER_DOC, docs=last + VAL_DOCS, val_start=last,
                                      val_count=VAL_DOCS, passes=args.passes, chunk=args.chunk, trials=args.trials,
                                      epochs=args.epochs, width=args.width))
        paths.append(path)
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "newllm_kit", "run", str(config), "--out", str(out), "--progress", "plain",
            "--set", "runner.threads=1"]


def ddp_command(config: Path, out: Path, timeout_s: float | None, *extra: str) -> list[str]:
    timeout = ["--set", f"runner.timeout_s={timeout_s:g}"] if timeout_s else []
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0",
            "-m", "newllm_kit", "run", str(config), "--out", str(out), "--progress", "plain",
            "--set", 'runner.name="ddp"', *timeout, *extra]


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found.setdefault(parent, []).append(int(proc.name))
    return found


def descendants(pid: int) -> list[int]:
    children, todo, found = _children(), [pid], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(parent: int) -> dict[int, int]:
    """torchrun's workers by RANK, read from /proc."""
    found = {}
    for pid in descendants(parent):
        with suppress(OSError, ValueError):
            env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                       if "=" in item)
            if "RANK" in env:
                found[int(env["RANK"])] = pid
    return found


def vm_hwm(pid: int) -> int | None:
    """A process's peak resident set in bytes (VmHWM), None once it is gone."""
    with suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def kill_tree(root: int) -> None:
    """SIGKILL to `root`'s process group and to every descendant's (torchrun's workers lead their own)."""
    mine = os.getpgid(0)
    for pid in [root, *descendants(root)]:
        with suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != mine:
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)


def launch(name: str, command: list[str], logs: Path, env: dict[str, str], ranked: bool,
           kill_at_phase2: bool = False, limit_s: float | None = None) -> dict[str, Any]:
    """Run one command to its end (or kill it at rank 0's Phase-2 start, or at `limit_s`): exit code, wall
    seconds, seconds to the Phase-2 start line, peak RSS per process polled from /proc, the ranks' lines."""
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    phase2 = threading.Event()
    with open(logs / f"{name}.stdout.txt", "w") as stdout:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)

        def read() -> None:
            assert job.stderr is not None
            with open(logs / f"{name}.stderr.txt", "w") as copy:
                for line in job.stderr:
                    copy.write(line)
                    lines.append((time.perf_counter() - started, line.rstrip("\n")))
                    if PHASE2_START.match(line):
                        phase2.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peaks: dict[int, int] = {}
        killed, over_limit = False, False
        while job.poll() is None:
            pids = rank_pids(job.pid) if ranked else {0: job.pid}
            for rank, pid in pids.items():
                peak = vm_hwm(pid)
                if peak is not None:
                    peaks[rank] = max(peaks.get(rank, 0), peak)
            if kill_at_phase2 and phase2.is_set():
                kill_tree(job.pid)
                killed = True
            elif limit_s is not None and time.perf_counter() - started > limit_s:
                kill_tree(job.pid)
                over_limit = True
            with suppress(subprocess.TimeoutExpired):
                job.wait(timeout=0.1)
        wall = time.perf_counter() - started
        reader.join(timeout=30)
    phase2_at = next((t for t, line in lines if PHASE2_START.match(line)), None)
    ranks = {}
    for _, line in lines:
        parsed = parse_timings_line(line)
        if parsed is not None:
            ranks[parsed["rank"]] = parsed
    text = "\n".join(line for _, line in lines)
    error = next((line for _, line in reversed(lines) if line.startswith("error:")), None)
    if killed:
        status = "killed at Phase 2 (on purpose)"
    elif over_limit:
        status = f"killed at the wall limit ({limit_s:.0f} s)"
    elif job.returncode == 0:
        status = "completed"
    elif TIMED_OUT.search(text):
        status = "timed out"
        error = next(line for _, line in lines if TIMED_OUT.search(line))
    else:
        status = f"failed (exit {job.returncode})"
    return {"name": name, "status": status, "returncode": job.returncode, "wall_s": wall,
            "phase2_start_s": phase2_at, "polled_peak_rss": peaks, "ranks": ranks, "error": error}


def rank_peaks(job: dict[str, Any]) -> dict[int, int]:
    """Each rank's peak RSS: its own line when it printed one, else the peak polled from outside."""
    peaks = {**job["polled_peak_rss"], **{r: line["peak_rss_bytes"] for r, line in job["ranks"].items()}}
    return dict(sorted(peaks.items()))


def results(out: Path) -> list[dict[str, Any]]:
    found = sorted(out.glob("rehearsal/*/results.jsonl"))
    return [json.loads(line) for line in found[-1].read_text().splitlines()] if found else []


def numbers(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a results row by dotted key, less what differs between runners by design."""
    found: dict[str, float] = {}
    for key, value in row.items():
        path = f"{prefix}{key}"
        if any(skip in path.split(".") for skip in NOT_COMPARED):
            continue
        if isinstance(value, dict):
            found |= numbers(value, f"{path}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[path] = float(value)
    return found


def compare(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact equality of the rows' numbers, and the largest relative difference (and where)."""
    if not got or not want:
        return {"compared": 0, "equal": None, "max_rel_diff": None, "where": None, "headline": {}}
    a, b = numbers(got[0]), numbers(want[0])
    keys = sorted(a.keys() & b.keys())
    diffs = {k: abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k])) if a[k] != b[k] else 0.0 for k in keys}
    worst = max(keys, key=lambda k: diffs[k]) if keys else None
    return {"compared": len(keys), "equal": all(a[k] == b[k] for k in keys) and a.keys() == b.keys(),
            "differing": sum(d > 0 for d in diffs.values()), "max_rel_diff": diffs[worst] if worst else None,
            "where": worst, "only_in_one": sorted(a.keys() ^ b.keys()),
            "headline": {k: [a.get(k), b.get(k)] for k in HEADLINE},
            "headline_max_rel_diff": max((diffs[k] for k in HEADLINE if k in diffs), default=None)}


def spread(values: list[float]) -> float | None:
    """(slowest − fastest) ÷ fastest; None when undefined."""
    return (max(values) - min(values)) / min(values) if len(values) > 1 and min(values) > 0 else None


def phase_table(job: dict[str, Any]) -> dict[str, Any]:
    """Per phase: each rank's seconds, waiting and busy (= seconds − waiting), and their spreads."""
    ranks = job["ranks"]
    names = list(dict.fromkeys(name for r in sorted(ranks) for name in ranks[r]["phases"]))
    table: dict[str, Any] = {}
    for name in names:
        per_rank = {r: ranks[r]["phases"].get(name) for r in sorted(ranks)}
        rows = {r: {**p, "busy_s": p["seconds"] - p["waiting_s"]} for r, p in per_rank.items() if p}
        longest = max((p["seconds"] for p in rows.values()), default=0.0)
        table[name] = {"ranks": rows, "seconds_spread": spread([p["seconds"] for p in rows.values()]),
                       "busy_spread": spread([p["busy_s"] for p in rows.values()]),
                       "judged": longest >= max(MIN_PHASE_S,
                                                MIN_PHASE_SHARE * max(r["total_s"] for r in ranks.values()))}
    return table


def memory(single: dict[str, Any], ddp: dict[str, Any], base_single: dict[str, Any] | None,
           base_ddp: dict[str, Any] | None) -> dict[str, Any]:
    """Stream memory = peak RSS − the same kind of process's peak at the baseline size; per-rank ÷ one process."""
    one = single["polled_peak_rss"].get(0)
    one_base = base_single["polled_peak_rss"].get(0) if base_single else None
    stream_one = one - one_base if one is not None and one_base is not None else one
    out: dict[str, Any] = {"one_process": {"peak_rss": one, "baseline_rss": one_base, "stream": stream_one},
                           "ranks": {}, "method": "peak RSS − baseline-size run" if base_single else
                           "raw peak RSS (no baseline run)"}
    base_ranks = rank_peaks(base_ddp) if base_ddp else {}
    for rank, peak in rank_peaks(ddp).items():
        base = base_ranks.get(rank)
        stream = peak - base if base is not None and base_single else peak
        out["ranks"][rank] = {"peak_rss": peak, "baseline_rss": base, "stream": stream,
                              "ratio": stream / stream_one if stream_one else None}
    ratios = [r["ratio"] for r in out["ranks"].values() if r["ratio"] is not None]
    out["worst_ratio"] = max(ratios) if ratios else None
    out["judged"] = stream_one is not None and stream_one >= MIN_STREAM
    return out


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f} MiB"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def verdict(value: float | None, target: float) -> str:
    return "unmeasured" if value is None else ("met" if value <= target else "NOT met")


def report_lines(result: dict[str, Any]) -> list[str]:
    runs, mem = result["runs"], result["memory"]
    lines = [f"machine: {result['machine']}",
             f"config: {result['tokens']:,} training tokens requested ({result['train_tokens']}), width "
             f"{result['width']}, {result['passes']} Phase-1 passes, {result['epochs']} Phase-2 epochs, "
             f"ddp timeout {result['timeout_s']:g} s", "", "runs:"]
    for job in runs.values():
        p2 = f", Phase 2 started at {job['phase2_start_s']:.1f} s" if job["phase2_start_s"] is not None else ""
        error = f" — {job['error']}" if job["error"] and job["status"] != "completed" else ""
        lines.append(f"  {job['name']:<14} {job['status']:<32} {job['wall_s']:8.1f} s{p2}{error}")
    lines += ["", f"memory ({mem['method']}; target per rank ≤ {TARGETS['stream_ratio']} × one process):",
              f"  one process: peak {mib(mem['one_process']['peak_rss'])}, baseline "
              f"{mib(mem['one_process']['baseline_rss'])}, stream {mib(mem['one_process']['stream'])}"]
    for rank, row in mem["ranks"].items():
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"  rank {rank}: peak {mib(row['peak_rss'])}, baseline {mib(row['baseline_rss'])}, stream "
                     f"{mib(row['stream'])} = {ratio} × one process")
    lines.append(f"  → {verdict(mem['worst_ratio'], TARGETS['stream_ratio'])}" if mem["judged"] else
                 f"  → not judged: the one process's stream part is under {mib(MIN_STREAM)}, within the noise of "
                 f"peak RSS (use more --tokens or a larger --width)")
    lines += ["", "unit seconds (results.jsonl, rank 0; a resumed unit keeps the seconds its checkpoint recorded "
                  "for the phases it did not run again, or 0):"]
    for name, seconds in result["seconds"].items():
        lines.append(f"  {name:<8} " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    for name in ("ddp", "resumed"):
        table = result["phases"].get(name) or {}
        if not table:
            continue
        lines += ["", f"phases of the {name} run (per rank: seconds / waiting in collectives / busy; spread = "
                      f"(slowest − fastest) ÷ fastest, target ≤ {TARGETS['phase_spread']:.0%}):"]
        for phase, row in table.items():
            cells = "; ".join(f"rank {r}: {p['seconds']:.1f} / {p['waiting_s']:.2f} / {p['busy_s']:.1f} s "
                              f"({p['collectives']:,} collectives, longest {p['longest_s']:.2f} s)"
                              for r, p in row["ranks"].items())
            lines.append(f"  {phase:<8} {cells}; spread {pct(row['seconds_spread'])}, busy {pct(row['busy_spread'])}")
        judged = [row["busy_spread"] for row in table.values() if row["judged"] and row["busy_spread"] is not None]
        worst = max(judged, default=None)
        lines.append(f"  → busy spread of the worst phase of {MIN_PHASE_S:g} s and {MIN_PHASE_SHARE:.0%} of the run "
                     f"or more: {pct(worst)}, {verdict(worst, TARGETS['phase_spread'])}")
    resume = result["resume"]
    lines += ["", f"resume (target ≤ {TARGETS['resume_ratio']} × the uninterrupted run's time after Phase 2 "
                  "started):"]
    if resume["ratio"] is None:
        lines.append(f"  not measured: {resume['why']}")
    else:
        lines.append(f"  resumed in {resume['resume_s']:.1f} s against {resume['remaining_s']:.1f} s remaining: "
                     f"{resume['ratio']:.2f}× → {verdict(resume['ratio'], TARGETS['resume_ratio'])}")
    lines += ["", "results.jsonl (numbers compared; seconds, token evaluations and store sizes left out):"]
    for pair, row in result["agreement"].items():
        if not row["compared"]:
            lines.append(f"  {pair}: no results to compare")
            continue
        worst = "" if not row["max_rel_diff"] else f", largest at {row['where']}"
        headline = row["headline_max_rel_diff"]
        head = ", ".join(f"{k} {a:.6g} vs {b:.6g}" for k, (a, b) in row["headline"].items()
                         if a is not None and b is not None)
        lines.append(f"  {pair}: {'equal' if row['equal'] else 'differ'} ({row['differing']} of {row['compared']} "
                     f"differ; max relative difference {row['max_rel_diff']:.3g}{worst}; of {', '.join(HEADLINE)}: "
                     f"{'—' if headline is None else f'{headline:.3g}'}); {head}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (default 1,000,000)")
    parser.add_argument("--width", type=int, default=64, help="C = E (v2 A: 768)")
    parser.add_argument("--timeout", type=float, default=20.0, help="runner.timeout_s of the ddp runs (seconds)")
    parser.add_argument("--passes", type=int, default=3, help="Phase-1 passes (min = max)")
    parser.add_argument("--epochs", type=int, default=2, help="Phase-2 epochs")
    parser.add_argument("--trials", type=int, default=2, help="solver.val_convergence_trials")
    parser.add_argument("--chunk", type=int, default=8000, help="solver.batch_size (Phase-1 chunk; v2: 8,000)")
    parser.add_argument("--baseline-tokens", type=int, default=None,
                        help="size of the runs that measure the fixed memory (default 3 chunks; 0: none)")
    parser.add_argument("--limit", type=float, default=None,
                        help="wall seconds after which a ddp job is killed (default 3 × the one-process run + 120)")
    parser.add_argument("--keep", type=Path, help="keep the configs, logs and run folders here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    baseline = 3 * args.chunk if args.baseline_tokens is None else args.baseline_tokens
    if args.tokens < 3 * args.chunk or (baseline and baseline < 3 * args.chunk):
        parser.error(f"--tokens and --baseline-tokens need at least 3 chunks ({3 * args.chunk:,} tokens), so each "
                     f"of two ranks owns whole chunks; lower --chunk")
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as temporary:
        root = args.keep or Path(temporary)
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        sizes = [args.tokens, *([baseline] if baseline else [])]
        config, *base_config = write_configs(root / "configs", sizes, args)
        runs: dict[str, dict[str, Any]] = {}
        outs = {name: root / name for name in ("single", "ddp", "resumed", "base-single", "base-ddp")}
        if base_config:
            runs["base-single"] = launch("base-single", single_command(base_config[0], outs["base-single"]), logs,
                                         env, ranked=False)
            runs["base-ddp"] = launch("base-ddp", ddp_command(base_config[0], outs["base-ddp"], None), logs, env,
                                      ranked=True)
        runs["single"] = launch("single", single_command(config, outs["single"]), logs, env, ranked=False)
        limit = args.limit or 3 * runs["single"]["wall_s"] + 120
        runs["ddp"] = launch("ddp", ddp_command(config, outs["ddp"], args.timeout), logs, env, ranked=True,
                             limit_s=limit)
        runs["killed"] = launch("killed", ddp_command(config, outs["resumed"], args.timeout), logs, env,
                                ranked=True, kill_at_phase2=True, limit_s=limit)
        resume: dict[str, Any] = {"ratio": None, "why": None}
        if runs["killed"]["status"].startswith("killed at Phase 2"):
            runs["resumed"] = launch("resumed", ddp_command(config, outs["resumed"], args.timeout, "--resume"), logs,
                                     env, ranked=True, limit_s=limit)
            ddp = runs["ddp"]
            if runs["resumed"]["status"] != "completed":
                resume["why"] = f"the resumed job {runs['resumed']['status']}"
            elif ddp["status"] != "completed" or ddp["phase2_start_s"] is None:
                resume["why"] = f"the uninterrupted ddp job {ddp['status']} (no remaining time to compare with)"
            else:
                remaining = ddp["wall_s"] - ddp["phase2_start_s"]
                resume |= {"resume_s": runs["resumed"]["wall_s"], "remaining_s": remaining,
                           "ratio": runs["resumed"]["wall_s"] / remaining}
        else:
            resume["why"] = f"the job to kill never reached Phase 2 ({runs['killed']['status']})"
        rows = {name: results(outs[name]) for name in ("single", "ddp", "resumed")}
        single_rows = rows["single"]
        train_tokens = single_rows[0]["train_tokens"] if single_rows else None
        result = {"machine": machine(), "tokens": args.tokens, "train_tokens": train_tokens, "width": args.width,
                  "passes": args.passes, "epochs": args.epochs, "trials": args.trials, "chunk": args.chunk,
                  "timeout_s": args.timeout, "baseline_tokens": baseline, "targets": TARGETS, "runs": runs,
                  "memory": memory(runs["single"], runs["ddp"], runs.get("base-single"), runs.get("base-ddp")),
                  "phases": {name: phase_table(runs[name]) for name in ("ddp", "resumed") if name in runs},
                  "resume": resume,
                  "agreement": {"ddp vs one process": compare(rows["ddp"], rows["single"]),
                                "resumed vs ddp": compare(rows["resumed"], rows["ddp"]),
                                "resumed vs one process": compare(rows["resumed"], rows["single"])},
                  "seconds": {name: r[0]["seconds"] for name, r in rows.items() if r}}
    emit(result, args.json, report_lines(result))


if __name__ == "__main__":
    main()
