"""`newllm-kit compare`: is one model (or sweep variant) better than another, beyond seed and
document noise?

For every pair at every training size: the difference of the means with a 95 % interval and a
verdict in words. val_ppl is compared on NLL (ln PPL; PPL and % are derived from it); where both
sides saved per-document sums for the same validation documents, the interval adds the paired
bootstrap over documents to the seed interval. Seeds are paired only where the design pairs them
(`--by variant`: one model's variants, the same seeds), Welch otherwise. Several comparisons in one
call get Holm's correction. For the scaling law: α per seed, a t-interval over seeds, the pooled
fit beside it. Sources whose data fingerprints differ are refused unless allowed, as `scaling` does.
Each comparison also carries each side's mean training FLOPs (`newllm_kit.flops`) and their ratio:
the compute behind a verdict at matched data (`plot` draws PPL against FLOPs, the compute-matched view).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import bootstrap, documents
from .errors import UserError
from .flops import flops_text, train_flops
from .result_sources import check_sources, load_records
from .scaling import Fit, Point, fit_all, series
from .stats import LEVEL, Difference, combine, estimate_difference, holm, paired, t_quantile, welch

# Metrics that are shares (0…1): differences read in percentage points, not relative to a mean.
SHARES = ("val_acc", "train_er", "val_er", "convergence_rate")
DOCUMENTS = "_documents"  # a record's per-document sums, read beside it: never written out


@dataclass(frozen=True)
class Comparison:
    context: str  # what both sides share: the size (and variant or model)
    a: str
    b: str
    mean_a: float
    mean_b: float
    difference: Difference
    p: float | None  # two-sided, of "no difference"; None: no test
    documents: int | None  # validation documents resampled (None: seeds only)
    why_none: str  # "one seed" where no test was possible for want of seeds; α: how it was estimated
    pooled: Difference | None = None  # α: the pooled fits' difference, beside the per-seed one
    pooled_alphas: tuple[float, float] | None = None
    p_holm: float | None = None
    verdict: str = ""
    flops: tuple[float, float] | None = None  # each side's mean training FLOPs, where every unit recorded them


def _sides(record: dict[str, Any], by: str) -> tuple[str, str]:
    """(the context both sides of a comparison share, the side this record is on)."""
    variant = record.get("variant") or ""
    size = f"{record['samples']:,} docs"
    if by == "model":
        return (f"{size} @{variant}" if variant else size), str(record["model"])
    return f"{record['model']}, {size}", variant


def _numeric(value: Any) -> bool:
    """A number a metric can be compared by: not text, and not a true/false flag (an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare_records(records: list[dict[str, Any]], metric: str, by: str) -> list[Comparison]:
    """Every pair of sides within every context, in the order the records list them."""
    if not any(_numeric(r.get(metric)) for r in records):  # absent, or text and flags such as `model`
        known = sorted(k for k, v in records[0].items() if _numeric(v))
        what = "not a number in the results" if any(metric in r for r in records) else "not in the results"
        raise UserError(f"--metric {metric}: {what}; choose one of {', '.join(known)}")
    if by == "variant" and not any(r.get("variant") for r in records):
        raise UserError("--by variant: these results have no sweep variants; use --by model")
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        context, side = _sides(r, by)
        if _numeric(r.get(metric)) and math.isfinite(r[metric]) and (metric != "val_ppl" or r[metric] > 0):
            groups.setdefault(context, {}).setdefault(side, []).append(r)
    out = []
    for context, sides in groups.items():
        for a, b in combinations(sides, 2):
            out.append(_compare(context, a, b, sides[a], sides[b], metric, by))
    if not out:
        raise UserError(_nothing_to_compare(records, metric, by))
    return out


def _nothing_to_compare(records: list[dict[str, Any]], metric: str, by: str) -> str:
    """Why no two sides met at any training size: one side only, or only one side has the metric."""
    sides = list(dict.fromkeys(_sides(r, by)[1] for r in records))
    what = "models" if by == "model" else "sweep variants"
    if len(sides) < 2:
        hint = ("; --by variant compares its sweep variants"
                if by == "model" and any(r.get("variant") for r in records) else "")
        return f"--by {by}: these results have one {what[:-1]} ({sides[0]}), nothing to compare it with{hint}"
    having = list(dict.fromkeys(_sides(r, by)[1] for r in records
                                if _numeric(r.get(metric)) and math.isfinite(r[metric])))
    if len(having) < 2:
        lacking = ", ".join(s for s in sides if s not in having)
        return (f"--metric {metric}: only {', '.join(having) or 'no side'} recorded it, not {lacking}; "
                f"choose a metric both sides recorded")
    return f"--by {by}: no two {what} share a training size, nothing to compare"


def _compare(context: str, a: str, b: str, left: list[dict[str, Any]], right: list[dict[str, Any]],
             metric: str, by: str) -> Comparison:
    """The seed part: paired by seed where the design pairs the two sides (`--by variant`, the same
    seeds), Welch otherwise; for val_ppl on NLL, with the documents' share where both sides have it."""
    nll = metric == "val_ppl"
    values_a = {r.get("seed"): _scale(r[metric], nll) for r in left}
    values_b = {r.get("seed"): _scale(r[metric], nll) for r in right}
    same_seeds = len(values_a) == len(left) and values_a.keys() == values_b.keys() and None not in values_a
    if by == "variant" and same_seeds and len(values_a) > 1:
        order = sorted(s for s in values_a if s is not None)
        diff = paired([values_a[s] for s in order], [values_b[s] for s in order])
    else:
        diff = welch([_scale(r[metric], nll) for r in left], [_scale(r[metric], nll) for r in right])
    mean_a = math.fsum(values_a.values()) / len(values_a) if same_seeds else \
        math.fsum(_scale(r[metric], nll) for r in left) / len(left)
    mean_b = math.fsum(_scale(r[metric], nll) for r in right) / len(right)
    p, documents_count = diff.p, None
    if nll and (sums := _shared_documents(left, right)) is not None:
        diff, p = _with_documents(diff, sums)
        documents_count = len(sums[2])
    if diff.low is None:
        diff = replace(diff, method="none")
    spread = (diff.n_a > 1 and diff.n_b > 1) or documents_count is not None
    flops_a, flops_b = _mean_flops(left), _mean_flops(right)
    return Comparison(context, a, b, mean_a, mean_b, diff, p, documents_count, "" if spread else "one seed",
                      flops=None if flops_a is None or flops_b is None else (flops_a, flops_b))


def _mean_flops(records: list[dict[str, Any]]) -> float | None:
    """A side's mean training FLOPs over its units; None where any unit has none (an older run)."""
    counted = [f for f in map(train_flops, records) if f is not None]
    return math.fsum(counted) / len(counted) if counted and len(counted) == len(records) else None


def _scale(value: float, nll: bool) -> float:
    """What a metric is compared on: val_ppl as NLL (ln PPL, nats per token), others as they are."""
    return math.log(value) if nll else value


def _shared_documents(left: list[dict[str, Any]], right: list[dict[str, Any]]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each side's per-document NLL sums averaged over its seeds, and the documents' scored tokens,
    where every unit on both sides saved them for the same validation documents (same fingerprints,
    same tokens per document); None otherwise."""
    units = [*left, *right]
    prints = {json.dumps(r.get("fingerprints"), sort_keys=True) for r in units}
    if any(r.get(DOCUMENTS) is None for r in units) or len(prints) > 1:
        return None
    sums: list[np.ndarray] = [r[DOCUMENTS] for r in units]
    tokens = sums[0][:, 2]
    if any(s.shape != sums[0].shape or not np.array_equal(s[:, 2], tokens) for s in sums):
        return None
    mean_a = np.mean([s[:, 0] for s in sums[:len(left)]], axis=0)
    mean_b = np.mean([s[:, 0] for s in sums[len(left):]], axis=0)
    return mean_a, mean_b, tokens


def _with_documents(seeds: Difference, sums: tuple[np.ndarray, np.ndarray, np.ndarray]
                    ) -> tuple[Difference, float | None]:
    """The seed interval widened by the paired document bootstrap's spread; with no seed interval (one
    seed on a side, or no seed-to-seed variation), the bootstrap's percentile interval alone."""
    replicates = bootstrap.mean_differences(*sums)
    spread = float(np.std(replicates, ddof=1))
    if seeds.se is not None:
        combined = combine(seeds, spread)
        return combined, combined.p
    if spread == 0:
        return replace(seeds, low=None, high=None, method="documents"), None
    low, high = bootstrap.percentile_interval(replicates)
    return replace(seeds, low=low, high=high, df=None, se=spread, method="documents"), bootstrap.p_value(replicates)


def _judge(comparisons: list[Comparison], metric: str) -> list[Comparison]:
    """Verdicts, with Holm's correction over every comparison that has a test."""
    tested = [i for i, c in enumerate(comparisons) if c.p is not None]
    adjusted = dict(zip(tested, holm([comparisons[i].p or 0.0 for i in tested]), strict=True))
    out = []
    for i, c in enumerate(comparisons):
        c = replace(c, p_holm=adjusted.get(i))
        out.append(replace(c, verdict=verdict(c, metric, len(tested))))
    return out


def verdict(c: Comparison, metric: str, tests: int) -> str:
    """"A lower PPL than B by 1.40% (95% CI −2.31% … −0.52%): distinguishable", or "…: within noise";
    val_ppl from NLL (% of PPL), shares in percentage points, other metrics in % of the second mean."""
    diff = c.difference
    if metric == "val_ppl":
        ratio = math.exp(diff.estimate) - 1
        text = f"{c.a} {'lower' if ratio < 0 else 'higher'} PPL than {c.b} by {100 * abs(ratio):.2f}%"
        if diff.low is not None and diff.high is not None:
            text += f" (95% CI {100 * math.expm1(diff.low):+.2f}% … {100 * math.expm1(diff.high):+.2f}%)"
    else:
        share = metric in SHARES
        scale, unit = (100.0, " points") if share else (100.0 / abs(c.mean_b) if c.mean_b else math.nan, "%")
        direction = "lower" if diff.estimate < 0 else "higher"
        text = f"{c.a} {direction} than {c.b} by {scale * abs(diff.estimate):.2f}{unit}"
        if diff.low is not None and diff.high is not None:
            text += f" ± {scale * (diff.high - diff.low) / 2:.2f}{unit}"
    if diff.low is None or diff.high is None:
        if c.why_none == "one seed":
            return f"{text}: no interval (one seed on a side; add experiment.seeds)"
        return f"{text}: not enough variation to compare"
    if not diff.excludes_zero:
        return f"{text}: within noise"
    if c.p_holm is not None and c.p_holm >= 1 - LEVEL:
        return f"{text}: within noise after Holm's correction for {tests} comparisons"
    return f"{text}: distinguishable"


def compare_alphas(fits: list[Fit], records: list[dict[str, Any]], by: str) -> list[Comparison]:
    """α of every pair of sides that share a context (the variant for --by model, the model for
    --by variant): one slope of ln PPL on ln tokens per seed, then the t-interval over seeds (paired
    by seed where the design pairs them); the pooled fit of all seeds' points beside it. With fewer
    than two seeds' slopes a side, the pooled fits alone (their standard errors, Welch)."""
    pooled = {f.model: f for f in fits}
    contexts: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        if series(r) in pooled and _numeric(r.get("val_ppl")) and r["val_ppl"] > 0:
            context, side = ((r.get("variant") or "", str(r["model"])) if by == "model"
                             else (str(r["model"]), r.get("variant") or ""))
            contexts.setdefault(context, {}).setdefault(side, []).append(r)
    out = []
    for context, sides in contexts.items():
        for a, b in combinations(sides, 2):
            fa, fb = pooled[series(sides[a][0])], pooled[series(sides[b][0])]
            slopes_a, slopes_b = _seed_slopes(sides[a]), _seed_slopes(sides[b])
            pooled_diff = _pooled(fa, fb)
            if len(slopes_a) > 1 and len(slopes_b) > 1:
                if by == "variant" and slopes_a.keys() == slopes_b.keys():
                    order = sorted(slopes_a)
                    diff = paired([slopes_a[s] for s in order], [slopes_b[s] for s in order])
                else:
                    diff = welch(list(slopes_a.values()), list(slopes_b.values()))
                mean_a = math.fsum(slopes_a.values()) / len(slopes_a)
                mean_b = math.fsum(slopes_b.values()) / len(slopes_b)
                how = f"one slope per seed, t over {len(slopes_a)}/{len(slopes_b)} seeds"
            elif pooled_diff is not None:
                diff, mean_a, mean_b, how = pooled_diff, fa.alpha, fb.alpha, "pooled fits"
            else:
                continue
            if diff.low is None:
                diff = replace(diff, method="none")
            out.append(Comparison(f"α{' @' + context if context else ''}", a, b, mean_a, mean_b, diff, diff.p,
                                  None, how, pooled=pooled_diff if how != "pooled fits" else None,
                                  pooled_alphas=(fa.alpha, fb.alpha)))
    return out


def _seed_slopes(records: list[dict[str, Any]]) -> dict[int, float]:
    """α of each seed with at least two training sizes: the least-squares slope of ln PPL on ln tokens."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        point = (math.log(r["train_tokens"]), math.log(r["val_ppl"]))
        by_seed.setdefault(r.get("seed") or 0, []).append(point)
    return {seed: float(np.polyfit([x for x, _ in points], [y for _, y in points], 1)[0])
            for seed, points in by_seed.items() if len({x for x, _ in points}) > 1}


def _pooled(fa: Fit, fb: Fit) -> Difference | None:
    """α(a) − α(b) of the pooled fits (every seed's points in one fit): Welch on their standard errors."""
    if fa.alpha_ci is None or fb.alpha_ci is None:
        return None
    diff = estimate_difference(fa.alpha, _alpha_se(fa), fa.points - 2, fb.alpha, _alpha_se(fb), fb.points - 2)
    return replace(diff, n_a=fa.points, n_b=fb.points, method="pooled fit")


def _alpha_verdict(c: Comparison, tests: int) -> str:
    d = c.difference
    text = f"α({c.a}) − α({c.b}) = {d.estimate:+.4f}"
    if d.low is None or d.high is None:
        text += ": not enough variation to compare"
    else:
        word = "distinguishable" if d.excludes_zero else "within noise"
        if d.excludes_zero and c.p_holm is not None and c.p_holm >= 1 - LEVEL:
            word = f"within noise after Holm's correction for {tests} comparisons"
        steeper = c.a if d.estimate < 0 else c.b
        text += f" (95% CI {d.low:+.4f} … {d.high:+.4f}, {c.why_none}): {steeper} scales more steeply, {word}"
    if c.pooled is not None and c.pooled.low is not None:
        text += (f"; pooled fit (all seeds' points in one fit): {c.pooled.estimate:+.4f} "
                 f"(95% CI {c.pooled.low:+.4f} … {c.pooled.high:+.4f})")
    return text


def _alpha_se(fit: Fit) -> float:
    assert fit.alpha_ci is not None
    return (fit.alpha_ci[1] - fit.alpha_ci[0]) / 2 / t_quantile(fit.points - 2)


def compare(sources: list[Path], metric: str, by: str, allow_mixed: bool) -> dict[str, Any]:
    """The whole comparison as the `--json` document."""
    if by not in ("model", "variant"):
        raise UserError(f"--by: expected model or variant (got {by!r})")
    records, warnings = load_records(sources)
    warnings += check_sources(records, allow_mixed)
    if metric == "val_ppl":
        warnings += _attach_documents(records)
    pairs = _judge(compare_records(records, metric, by), metric)
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]), None, r["source"], r.get("seed"))
              for r in records if isinstance(r.get("val_ppl"), int | float) and math.isfinite(r["val_ppl"])]
    fittable = [p for p in points if len({q.tokens for q in points if q.model == p.model}) >= 2]
    # α belongs to the PPL scaling law: shown beside PPL comparisons only
    alphas = compare_alphas(fit_all(fittable, []).fits, records, by) if fittable and metric == "val_ppl" else []
    tested = [i for i, c in enumerate(alphas) if c.p is not None]
    adjusted = dict(zip(tested, holm([alphas[i].p or 0.0 for i in tested]), strict=True))
    alphas = [replace(c, p_holm=adjusted.get(i)) for i, c in enumerate(alphas)]
    alphas = [replace(c, verdict=_alpha_verdict(c, len(tested))) for c in alphas]
    tests = sum(c.p is not None for c in pairs)
    return {"sources": sorted({r["source"] for r in records}), "metric": metric, "by": by,
            "scale": "nll" if metric == "val_ppl" else metric,
            "holm": {"comparisons": tests, "alpha": len(tested)},
            "comparisons": [_to_json(c) for c in pairs], "alpha": [_to_json(c) for c in alphas],
            "warnings": warnings}


def _attach_documents(records: list[dict[str, Any]]) -> list[str]:
    """Each record's per-document sums (`newllm_kit.documents`) under DOCUMENTS, where its run saved
    them and they add up to the record; a one-line warning for each file that does not."""
    warnings = []
    for r in records:
        folder = Path(r["source"]).parent
        sums, warning = documents.read(folder, r)
        if sums is not None:
            r[DOCUMENTS] = sums
        if warning:
            warnings.append(warning)
    return warnings


def _to_json(c: Comparison) -> dict[str, Any]:
    d = c.difference
    out: dict[str, Any] = {
        "context": c.context, "a": c.a, "b": c.b, "mean_a": c.mean_a, "mean_b": c.mean_b,
        "difference": d.estimate, "ci": None if d.low is None else [d.low, d.high], "method": d.method,
        "n_a": d.n_a, "n_b": d.n_b, "documents": c.documents, "p": c.p, "p_holm": c.p_holm, "verdict": c.verdict,
        "flops_a": None if c.flops is None else c.flops[0], "flops_b": None if c.flops is None else c.flops[1]}
    if c.pooled_alphas is not None:
        p = c.pooled
        out["pooled"] = {"alpha_a": c.pooled_alphas[0], "alpha_b": c.pooled_alphas[1],
                         **({} if p is None else {"difference": p.estimate,
                                                  "ci": None if p.low is None else [p.low, p.high]})}
    return out


def _flops_cell(c: dict[str, Any]) -> str:
    """"3.21e12 / 1.39e12 (2.31×)": the compute each side spent at this training size, and its ratio."""
    a, b = c.get("flops_a"), c.get("flops_b")
    if a is None or b is None:
        return "—"
    return f"{flops_text(a)} / {flops_text(b)} ({a / b:.3g}×)"


def render(document: dict[str, Any], console: Console) -> None:
    console.print(escape(f"sources: {', '.join(document['sources'])}"))
    nll = document["scale"] == "nll"
    # Headers name the sides by position, never by letters a model could be called; names fold onto
    # further lines instead of being cut, so two rows never look alike.
    title = ("val_ppl, compared on NLL (nats per token; means shown as PPL)" if nll else document["metric"])
    table = Table(title=f"{title}: first − second, 95% interval",
                  caption="n: seeds (points for a fit); paired: by seed (--by variant, the same seeds); welch: "
                          "unpaired seeds; +documents: with the paired bootstrap over validation documents; "
                          "documents: the bootstrap alone (seed noise not measured); α: one slope per seed; "
                          "no test: one seed on a side, or no variation; FLOPs: each side's mean training "
                          "FLOPs and first ÷ second (— where a run did not record them)")
    for column in ("Where", "First", "Second", "n", "Mean, first", "Mean, second", "First − second (95% CI)",
                   "Test", "FLOPs, first / second"):
        text = column in ("Where", "First", "Second", "Test")
        table.add_column(column, justify="left" if text else "right", overflow="fold")
    for c in document["comparisons"] + document["alpha"]:
        ppl = nll and not c["context"].startswith("α")
        ci = f"[{c['ci'][0]:.4g}, {c['ci'][1]:.4g}]" if c["ci"] else "—"
        means = [f"{math.exp(m):.4g}" if ppl else f"{m:.4g}" for m in (c["mean_a"], c["mean_b"])]
        table.add_row(escape(c["context"]), escape(c["a"]), escape(c["b"]), f"{c['n_a']}/{c['n_b']}", *means,
                      f"{c['difference']:+.4g} {ci}", c["method"] if c["ci"] else "no test", _flops_cell(c))
    console.print(table)
    for c in document["comparisons"] + document["alpha"]:
        console.print(f"{escape(c['context'])}: {escape(c['verdict'])}")
    holm_counts = document["holm"]
    if holm_counts["comparisons"] > 1 or holm_counts["alpha"] > 1:
        groups = [f"the {count} {what}" for what, count in (("comparisons", holm_counts["comparisons"]),
                                                             ("α comparisons", holm_counts["alpha"])) if count > 1]
        console.print(f"Verdicts use Holm's correction over {' and, apart, '.join(groups)} of this call; "
                      f"intervals are each 95 %.")
    for warning in document["warnings"]:
        console.print(f"[yellow]warning: {escape(warning)}[/]")
