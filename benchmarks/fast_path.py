"""Fast path against the faithful one: whole CLI units, side by side, on A- and B-shaped models.

Faithful: iteration 0 is the sequential rollout and Phase 2 trains on the frozen sequential
rollout of the training stream (v2). Fast (`experiments/v2-fast.toml`'s two changes):
`solver.init = "random"` and `phase2.train_contexts = "phase1"`, so nothing runs sequentially
over the training stream (the validation stream stays a rollout). Each run is one
`python -m newllm_kit run` on the synthetic corpus with the `bytes` tokenizer (the scale
benchmark's data), 3 Phase-1 passes and one Phase-2 epoch; shapes are v2 A and B at a third of
their widths (A: 6 layers, C = 256; B: 3 layers, C = 512; E = 256).

Per run: seconds per phase (results.jsonl), the sequential seconds (iteration 0's rollout, read
from metrics.jsonl, plus the frozen solves, which are sequential for these non-contracting
blocks), the whole-unit speed-up fast ÷ faithful, and the context agreement the unit recorded.
Runs alternate faithful and fast per shape, so a change in the machine's load hits both.

    python benchmarks/fast_path.py --tokens 16000
    python benchmarks/fast_path.py --tokens 64000 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from _common import emit, machine
from scale import run_cli, write_configs

SHAPES = {"A": ["models.0.layers=6", "models.0.context_dim=256"],
          "B": ["models.0.layers=3", "models.0.context_dim=512"]}
PATHS = {"faithful": [], "fast": ['solver.init="random"', 'phase2.train_contexts="phase1"']}


def iteration0_seconds(out: Path) -> float:
    """Phase 1's iteration 0 (the rollout, or the random draw) from the run's metrics.jsonl."""
    metrics = next((out / "runs").glob("scale/*/metrics.jsonl"))
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("phase") == "phase1" and row.get("iteration") == 0:
            return float(row["seconds"])
    return 0.0


def one(config: Path, root: Path, shape: str, path: str) -> dict[str, Any]:
    out = root / f"{shape}-{path}"
    out.mkdir(parents=True)
    run = run_cli(config, out, SHAPES[shape] + PATHS[path], {})
    record = json.loads(next((out / "runs").glob("scale/*/results.jsonl")).read_text().splitlines()[-1])
    seconds = run["seconds"]
    unit = seconds["phase1"] + seconds["solve"] + seconds["phase2"]
    sequential = iteration0_seconds(out) + seconds["solve"]
    return {"shape": shape, "path": path, "tokens": run["tokens"], "seconds": seconds, "unit_seconds": unit,
            "sequential_seconds": sequential, "sequential_share": sequential / unit,
            "context_agreement": record.get("context_agreement"), "val_ppl": record["val_ppl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16000, help="training-stream length")
    parser.add_argument("--shapes", default="A,B")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fast-path-") as temporary:
        root = Path(temporary)
        (config,) = write_configs(root / "configs", [args.tokens], 3, "auto")
        runs = [one(config, root, shape, path) for shape in args.shapes.split(",") for path in PATHS]
    lines = [f"machine: {machine()}"]
    speedups = {}
    for shape in args.shapes.split(","):
        faithful, fast = (next(r for r in runs if r["shape"] == shape and r["path"] == p) for p in PATHS)
        speedups[shape] = faithful["unit_seconds"] / fast["unit_seconds"]
        for r in (faithful, fast):
            s = r["seconds"]
            agreement = r["context_agreement"] or {}
            lines.append(f"{shape} {r['path']:>8}: {r['tokens']:,} tokens, phase1 {s['phase1']:.1f} s, solve "
                         f"{s['solve']:.1f} s, phase2 {s['phase2']:.1f} s; sequential {r['sequential_share']:.0%}; "
                         f"val PPL {r['val_ppl']:.2f}; cosine {agreement.get('mean_cosine', float('nan')):.4f}")
        lines.append(f"{shape}: whole-unit speed-up {speedups[shape]:.2f}x")
    emit({"machine": machine(), "tokens": args.tokens, "runs": runs, "speedup": speedups}, args.json, lines)


if __name__ == "__main__":
    main()
