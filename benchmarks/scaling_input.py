"""`newllm-kit scaling` on large CSV tables: its cost must grow linearly with the input.

Writes a 5 MB and a 50 MB table (model, tokens, val_ppl; four models, random sizes and PPLs,
about 19 bytes a row) into a temporary folder, runs `newllm-kit scaling` on each in a fresh
process, and reports wall seconds, the child's peak memory and the 50 MB / 5 MB time ratio
(about 10 when linear; a quadratic step shows as about 100). The target is 50 MB in ≤ 10 s.
Absolute seconds depend on the load of the machine, which is printed beside them.

    python benchmarks/scaling_input.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES_MB = (5, 50)


def write_table(path: Path, megabytes: int, seed: int = 0) -> int:
    """A CSV of about `megabytes` MB; returns its number of data rows."""
    rng = random.Random(seed)
    rows = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write("model,tokens,val_ppl\n")
        while handle.tell() < megabytes * 1_000_000:
            lines = [f"M{rng.randrange(4)},{rng.randrange(1000, 10**7)},{rng.uniform(20, 900):.3f}\n"
                     for _ in range(10_000)]
            handle.write("".join(lines))
            rows += len(lines)
    return rows


def time_scaling(table: Path) -> dict[str, Any]:
    """One `newllm-kit scaling TABLE --json` in its own process: seconds, peak RSS, exit code."""
    command = [sys.executable, "-m", "newllm_kit", "scaling", str(table), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    # RUSAGE_CHILDREN holds the largest child so far; the tables are timed smallest first
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        raise SystemExit(f"newllm-kit scaling {table} failed (exit {done.returncode}): {done.stderr.strip()}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb), "exit_code": done.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="Print one JSON document instead of lines.")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for megabytes in SIZES_MB:
            table = Path(folder) / f"table-{megabytes}mb.csv"
            rows = write_table(table, megabytes)
            results.append({"megabytes": megabytes, "rows": rows, "bytes": table.stat().st_size,
                            **time_scaling(table)})
    ratio = results[1]["seconds"] / results[0]["seconds"]
    document = {"benchmark": "scaling_input", "results": results, "ratio_50_to_5": round(ratio, 2),
                "target_50mb_seconds": 10, "load_average": [round(x, 2) for x in os.getloadavg()],
                "cores": os.cpu_count()}
    if args.json:
        print(json.dumps(document, indent=2))
        return
    for r in results:
        print(f"{r['megabytes']:>3} MB ({r['rows']:,} rows): {r['seconds']:.2f} s, peak {r['peak_rss_mb']:,} MB")
    print(f"50 MB / 5 MB time: {ratio:.1f}× (linear ≈ 10×); load average {document['load_average']}")


if __name__ == "__main__":
    main()
