"""Kill -9 anywhere: a two-unit cvfp run killed at random moments and resumed gives the uninterrupted
results, and a killed solve continues from its last save instead of starting over.

One uninterrupted run gives the reference results and the wall time T. Then, `--kills` times,
the same run is started in a fresh folder, killed with SIGKILL at a seeded random moment in
[0.03 T, 0.97 T] (so inside Phase 1, the frozen rollouts, the validation trials or Phase 2) and
resumed to the end. For each kill it reports where the log stood (the last progress line), what
the kill left saved (`checkpoints/<unit>/solve-*.json`: the position a rollout had saved,
`trials.json`: the trials saved), what the resume said it continued from, and whether every
number of results.jsonl except the seconds equals the reference bit for bit.

The run: the synthetic corpus, `bytes` tokenizer, a 3-layer gradual-reduction model at C = E = 32,
two training sizes (about 22k and 44k tokens, so the training rollout spans several 8,192-row
blocks), 3 Phase-1 passes with a sequential iteration 0, 6 validation convergence trials, 3
Phase-2 epochs, `solver.checkpoint_every = 0` (a save after every block and every trial).

    python benchmarks/kill_resume.py                # 10 kills
    python benchmarks/kill_resume.py --kills 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
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
name = "kills"
samples = [60, 120]
seed = 0

[data]
source = "synthetic"
words_per_doc = 100
docs = 400
val = { start = 350, count = 30 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"
freeze = true

[solver]
name = "cvfp"
init = "rollout"
solve = "sequential"
min_iterations = 3
max_iterations = 3
val_convergence_trials = 6
checkpoint_every = 0

[phase2]
epochs = 3
patience = 3
batch_size = 512

[runner]
name = "cpu"
threads = 1

[[models]]
label = "A"
variant = "gradual-reduction"
layers = 3
context_dim = 32
embedding_dim = 32
"""
PROGRESS = re.compile(r"^\[[\d:]+\] (?P<what>.*)$")


def start(config: Path, out: Path, log: Path, resume: bool = False) -> subprocess.Popen[bytes]:
    target = [str(run_dir(out))] if resume else [str(config), "--out", str(out)]
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "newllm_kit", "run", *target, "--progress", "plain"],
                                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def run_dir(out: Path) -> Path | None:
    return next((p for p in out.glob("kills/*") if (p / "config.resolved.toml").is_file()), None)


def results(out: Path) -> list[dict[str, Any]]:
    """The records without their timings (the only numbers a resume may change)."""
    lines = next(out.glob("kills/*/results.jsonl")).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def saved_state(out: Path) -> dict[str, Any]:
    """What the killed run left saved: per unit, each solve's position (or "done") and the trials saved."""
    found: dict[str, Any] = {}
    for file in out.glob("kills/*/checkpoints/*/solve-*.json"):
        state = json.loads(file.read_text())
        found[f"{file.parent.name}/{file.stem}"] = "done" if state.get("result") else state["position"]
    for file in out.glob("kills/*/checkpoints/*/trials.json"):
        found[f"{file.parent.name}/trials"] = json.loads(file.read_text())["done"]
    for file in out.glob("kills/*/checkpoints/*/LATEST"):
        found[f"{file.parent.name}/stage"] = file.read_text().strip().rsplit("-", 1)[0]
    return found


def last_progress(log: Path) -> str:
    lines = [m["what"] for line in log.read_text(errors="replace").splitlines() if (m := PROGRESS.match(line))]
    return lines[-1] if lines else "(nothing yet)"


def continued(log_text: str) -> list[str]:
    """The resume's lines that say what it did not do again."""
    keys = ("continues from position", "read back from the checkpoint", "continuing after trial",
            "resumed from checkpoint", "already finished")
    return [line.split("] ", 1)[-1] for line in log_text.splitlines() if any(k in line for k in keys)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "kills.toml"
        config.write_text(CONFIG)
        began = time.perf_counter()
        reference_run = start(config, tmp / "reference", tmp / "reference.log")
        if reference_run.wait() != 0:
            tail = (tmp / "reference.log").read_text()[-2000:]
            raise SystemExit(f"kill_resume: the uninterrupted run failed:\n{tail}")
        total = time.perf_counter() - began
        reference = results(tmp / "reference")
        kills = []
        for k in range(args.kills):
            out, log = tmp / f"killed-{k}", tmp / f"killed-{k}.log"
            moment = rng.uniform(0.03, 0.97) * total
            job = start(config, out, log)
            try:
                job.wait(timeout=moment)
                finished_first = True
            except subprocess.TimeoutExpired:
                job.send_signal(signal.SIGKILL)
                job.wait()
                finished_first = False
            at, saved = last_progress(log), saved_state(out)
            before = len(log.read_text(errors="replace"))
            resumed_at = time.perf_counter()
            code = start(config, out, log, resume=run_dir(out) is not None).wait()
            resume_s = time.perf_counter() - resumed_at
            said = continued(log.read_text(errors="replace")[before:])
            equal = code == 0 and results(out) == reference
            kills.append({"moment_s": round(moment, 2), "killed_at": at, "saved": saved, "resume_said": said,
                          "resume_s": round(resume_s, 2), "exit": code, "equal": equal,
                          "finished_before_kill": finished_first})
    # A solve that had saved a position must continue from it, not from 0.
    restarted = [k for k in kills if any(isinstance(v, int) and v > 0 and not any(
        f"{name.split('/')[1].removeprefix('solve-')} rollout continues from position {v:,}" in line
        for line in k["resume_said"]) for name, v in k["saved"].items() if "/solve-" in name)]
    result = {"benchmark": "kill_resume", "machine": machine(), "uninterrupted_s": round(total, 2),
              "kills": kills, "all_equal": all(k["equal"] for k in kills),
              "solves_restarted_from_zero": len(restarted)}
    lines = [f"uninterrupted run: {total:.1f} s; {len(kills)} kills at seeded random moments", ""]
    for k in kills:
        lines.append(f"{k['moment_s']:6.1f} s  {k['killed_at'][:60]:60}  saved {k['saved']}")
        lines.append(f"          resume {k['resume_s']:.1f} s: {'; '.join(k['resume_said']) or '-'} -> "
                     f"{'equal' if k['equal'] else 'DIFFERENT'}")
    lines += ["", f"results equal to the uninterrupted run: {sum(k['equal'] for k in kills)}/{len(kills)}; "
                  f"saved solves restarted from 0: {len(restarted)}"]
    emit(result, args.json, lines)
    if not result["all_equal"] or restarted:
        sys.exit(1)


if __name__ == "__main__":
    main()
