"""Coverage of `compare`'s 95 % intervals on synthetic comparisons with a known true difference.

Three interval kinds, each over `--trials` synthetic comparisons drawn from a seeded generator:

- documents: two models scored on the same D validation documents (one seed each); a document's
  NLL per token is the model's level + the document's difficulty (shared) + a model × document
  effect, plus token noise; the interval is the paired bootstrap's percentile interval over documents
  (`newllm_kit.bootstrap`). True difference: the difference of the levels.
- seeds + documents: the same with 3 seeds a side, each seed shifting all of its documents; Welch over
  the seeds' NLLs widened by the bootstrap's spread (`newllm_kit.stats.combine`).
- α seeds: 3 seeds a side at 3 training sizes; one slope of ln PPL on ln tokens per seed, Welch over
  the seeds (`newllm_kit.compare._seed_slopes` fits the same way). True difference: α(A) − α(B).

Target: each coverage within 93–97 % at ≥ 1,000 trials. `--json` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np

from newllm_kit import bootstrap
from newllm_kit.stats import combine, welch

LEVEL_GAP, DOCUMENTS, SEEDS = 0.03, 150, 3


def _documents(rng: np.random.Generator, documents: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per document and each document's difficulty (NLL per token, shared by both models)."""
    tokens = rng.integers(20, 400, size=documents).astype(np.float64)
    return tokens, 5.0 + rng.normal(0, 0.5, size=documents)


def _nll_sums(rng: np.random.Generator, level: float, tokens: np.ndarray, difficulty: np.ndarray,
              seed_shift: float = 0.0) -> np.ndarray:
    """Per-document NLL sums of one model (and seed): level + difficulty + a model × document effect,
    each token with noise of sd 2 nats."""
    per_token = level + seed_shift + difficulty + rng.normal(0, 0.08, size=tokens.size)
    return tokens * per_token + rng.normal(0, 2.0, size=tokens.size) * np.sqrt(tokens)


def documents_trial(rng: np.random.Generator, resamples: int) -> bool:
    tokens, difficulty = _documents(rng, DOCUMENTS)
    a, b = _nll_sums(rng, LEVEL_GAP, tokens, difficulty), _nll_sums(rng, 0.0, tokens, difficulty)
    replicates = bootstrap.mean_differences(a, b, tokens, resamples, seed=int(rng.integers(2**31)))
    low, high = bootstrap.percentile_interval(replicates)
    return low <= LEVEL_GAP <= high


def seeds_and_documents_trial(rng: np.random.Generator, resamples: int) -> bool:
    tokens, difficulty = _documents(rng, DOCUMENTS)
    model_effect = {m: rng.normal(0, 0.08, size=DOCUMENTS) for m in ("A", "B")}  # fixed per model
    sides = {}
    for model, level in (("A", LEVEL_GAP), ("B", 0.0)):
        runs = []
        for _ in range(SEEDS):
            per_token = level + rng.normal(0, 0.02) + difficulty + model_effect[model] \
                + rng.normal(0, 0.02, size=DOCUMENTS)  # seed shift, and the seed's own document noise
            runs.append(tokens * per_token + rng.normal(0, 2.0, size=DOCUMENTS) * np.sqrt(tokens))
        sides[model] = np.array(runs)
    nll = {m: list(s.sum(1) / tokens.sum()) for m, s in sides.items()}
    seeds = welch(nll["A"], nll["B"])
    replicates = bootstrap.mean_differences(sides["A"].mean(0), sides["B"].mean(0), tokens, resamples,
                                            seed=int(rng.integers(2**31)))
    both = combine(seeds, float(np.std(replicates, ddof=1)))
    assert both.low is not None and both.high is not None
    return both.low <= LEVEL_GAP <= both.high


def alpha_trial(rng: np.random.Generator, resamples: int) -> bool:
    del resamples  # no bootstrap: the t-interval over seeds
    sizes = np.log([10_000.0, 20_000.0, 40_000.0])
    alphas = {"A": -0.40, "B": -0.32}
    slopes = {}
    for model, alpha in alphas.items():
        slopes[model] = [float(np.polyfit(sizes, 9.0 + rng.normal(0, 0.1) + (alpha + rng.normal(0, 0.03)) * sizes
                                          + rng.normal(0, 0.02, size=sizes.size), 1)[0]) for _ in range(SEEDS)]
    diff = welch(slopes["A"], slopes["B"])
    assert diff.low is not None and diff.high is not None
    return diff.low <= alphas["A"] - alphas["B"] <= diff.high


KINDS: dict[str, Callable[[np.random.Generator, int], bool]] = {
    "documents": documents_trial, "seeds_and_documents": seeds_and_documents_trial, "alpha_seeds": alpha_trial}


def coverage(kind: str, trials: int, resamples: int = bootstrap.RESAMPLES, seed: int = 0) -> float:
    """The share of `trials` comparisons whose 95 % interval covers the true difference."""
    rng = np.random.default_rng(seed)
    return sum(KINDS[kind](rng, resamples) for _ in range(trials)) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for kind in KINDS:
        started = time.perf_counter()
        share = coverage(kind, args.trials, args.resamples)
        margin = 1.96 * math.sqrt(share * (1 - share) / args.trials)
        results[kind] = {"coverage": share, "binomial_95_margin": margin, "trials": args.trials,
                         "in_target": 0.93 <= share <= 0.97, "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps({"level": 0.95, "target": [0.93, 0.97], "resamples": args.resamples, "results": results}))
        return
    for kind, r in results.items():
        print(f"{kind:>20}: {100 * r['coverage']:.1f}% ± {100 * r['binomial_95_margin']:.1f} of {r['trials']} "
              f"intervals cover the true difference ({'within' if r['in_target'] else 'OUTSIDE'} 93–97 %), "
              f"{r['seconds']} s")


if __name__ == "__main__":
    main()
