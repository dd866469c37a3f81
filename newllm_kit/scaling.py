"""Scaling-law fits of validation PPL against training tokens, with honest uncertainty.

`PPL = A · tokens^α` is fitted by OLS in log space. Intervals are reported only when the data
can support them (≥ 3 distinct token counts): two points always fit exactly. The offset form
`PPL = E + A · tokens^α` (Huber loss in log space) is shown beside the power law, never instead.
Everything here is pure; the CLI only formats and prints.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DataError, UserError

HUBER_DELTA = 1e-3  # on log-PPL residuals, as in Chinchilla-style fits: nearly L1 beyond 0.1 %


class Point(NamedTuple):
    model: str  # the series a fit is drawn through: the model, or `model@variant` in a sweep
    tokens: float
    ppl: float
    fingerprint: str | None
    source: str
    seed: int | None = None  # replicates of one model and size differ in their seed


def series(record: dict[str, Any]) -> str:
    """What a fit or comparison groups a record under: `A`, or `A@lr-0.1` for a sweep variant's A."""
    variant = record.get("variant") or ""
    return f"{record['model']}@{variant}" if variant else str(record["model"])


@dataclass
class Prediction:
    tokens: float
    ppl: float
    pi: tuple[float, float] | None  # 95 % prediction interval; None when it cannot be estimated
    extrapolation: float  # tokens / largest observed token count


@dataclass
class OffsetFit:
    E: float
    A: float
    alpha: float
    predictions: list[Prediction]


@dataclass
class Fit:
    model: str
    alpha: float
    A: float
    r2: float
    points: int
    doubling_reduction: float  # 1 − 2^α: the share of PPL removed by doubling the data
    alpha_ci: tuple[float, float] | None
    predictions: list[Prediction]
    offset: OffsetFit | None = None
    warnings: list[str] = field(default_factory=list)
    sizes: int = 0  # distinct token counts the fit rests on
    seeds: int = 1  # replicates (seeds) per size, at most


@dataclass
class ScalingReport:
    fits: list[Fit]
    warnings: list[str]
    form: str = "power"
    sources: list[str] = field(default_factory=list)  # the files the points came from


def _number(raw: Any, what: str, where: str) -> float:
    """A finite, positive float, or a one-line DataError naming where it came from."""
    try:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(raw)
        value = float(raw)
    except OverflowError:  # an integer beyond float range, e.g. a JSON 1 followed by 400 zeros
        raise DataError(f"{where}: {what} must be finite and positive (got a {len(str(raw))}-digit number)") from None
    except ValueError:
        raise DataError(f"{where}: {what} is not a number ({raw!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{where}: {what} must be finite and positive (got {raw!r})")
    return value


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a spreadsheet's BOM must not rename "model"
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"cannot read {path}: line {line} is not UTF-8 text") from None


def _load_jsonl(path: Path, text: str) -> list[Point]:
    points = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: not a results record (nested too deeply)") from None
        if not isinstance(record, dict) or not {"model", "train_tokens", "val_ppl"} <= record.keys():
            raise DataError(f"{where}: expected a JSON object with model, train_tokens and val_ppl")
        prints = record.get("fingerprints")
        seed = record.get("seed")
        points.append(Point(series(record), _number(record["train_tokens"], "train_tokens", where),
                            _number(record["val_ppl"], "val_ppl", where),
                            None if prints is None else json.dumps(prints, sort_keys=True), str(path),
                            seed if isinstance(seed, int) else None))
    return points


def _load_csv(path: Path, text: str) -> list[Point]:
    """A table with model, tokens (or a run's `results.csv` name, train_tokens) and val_ppl columns."""
    reader = csv.DictReader(text.splitlines())
    names = [name.strip() for name in reader.fieldnames or []]
    tokens = "tokens" if "tokens" in names else "train_tokens"
    missing = [c for c in ("model", tokens, "val_ppl") if c not in names]
    if names and missing:
        missing = ["tokens (or train_tokens)" if c == tokens else c for c in missing]
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (need model, tokens, val_ppl)")
    points = []
    for raw in reader:
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
        where = f"{path}: row {reader.line_num}"
        if not row["model"]:
            raise DataError(f"{where}: empty model name")
        seed = row.get("seed") or ""
        points.append(Point(series(row), _number(row[tokens], tokens, where),
                            _number(row["val_ppl"], "val_ppl", where), row.get("fingerprint") or None,
                            str(path), int(seed) if seed.isdigit() else None))
    return points


def _status(run: Path) -> str | None:
    """A run directory's `status` from meta.json (None when there is no readable one)."""
    try:
        meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = meta.get("status") if isinstance(meta, dict) else None
    return status if isinstance(status, str) else None


def _has_results(run: Path) -> bool:
    path = run / "results.jsonl"  # written once the first unit finishes, never empty after that
    return path.is_file() and path.stat().st_size > 0


def _why_empty(run: Path) -> str:
    """What a run directory without finished units says about itself, from meta.json."""
    status = _status(run)
    if status == "failed":
        return "this run failed before any unit finished (see meta.json)"
    if status in ("running", "interrupted"):
        return f"no unit of this run has finished yet (status {status!r} in meta.json)"
    return "no results.jsonl in this directory"


def load_points(sources: list[Path]) -> tuple[list[Point], list[str]]:
    """Read run directories, results.jsonl files and CSV tables into one list (plus warnings)."""
    points: list[Point] = []
    warnings: list[str] = []
    done: set[Path] = set()
    for source in sources:
        path = source / "results.jsonl" if source.is_dir() else source
        if source.is_dir() and not _has_results(source):
            raise DataError(f"{source}: {_why_empty(source)}")
        if source.is_dir() and _status(source) == "failed":
            warnings.append(f"{source}: this run failed (see meta.json); fitting the units it finished")
        if path.resolve() in done:
            warnings.append(f"{path} was given twice; read once")
            continue
        done.add(path.resolve())
        text = _read(path)
        is_jsonl = path.suffix in (".jsonl", ".json") or (path.suffix != ".csv" and text.lstrip()[:1] == "{")
        loaded = _load_jsonl(path, text) if is_jsonl else _load_csv(path, text)
        if not loaded:
            raise DataError(f"{path}: empty (no data rows)")
        points.extend(loaded)
    return _drop_repeats(points, warnings), warnings


def _drop_repeats(points: list[Point], warnings: list[str]) -> list[Point]:
    """Keep one copy of each result: the same model, tokens and PPL from the same data (equal or
    missing fingerprints) is one measurement, and counting it twice would narrow every interval."""
    kept: dict[tuple[str, float, float], list[Point]] = {}
    repeats: dict[tuple[str, str], list[Point]] = {}  # (source, source of the kept copy) -> repeats
    for p in points:
        same = kept.setdefault((p.model, p.tokens, p.ppl), [])
        twin = next((q for q in same if None in (p.fingerprint, q.fingerprint) or p.fingerprint == q.fingerprint),
                    None)
        if twin is None:
            same.append(p)
        else:
            repeats.setdefault((p.source, twin.source), []).append(p)
    for (source, original), extra in repeats.items():
        names = ", ".join(f"{p.model} at {p.tokens:,.0f} tokens" for p in extra[:3])
        names += f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        where = "more than once" if source == original else f"from {original} again"
        warnings.append(f"{source} lists {len(extra)} point(s) {where} ({names}); each is counted once")
    return [p for same in kept.values() for p in same]


def latest_run_dir(root: Path = Path("runs")) -> tuple[Path, list[str]]:
    """The most recently modified `runs/<experiment>/<run>/` with finished units that did not fail,
    and a note for each newer run passed over (a user who just saw a run fail must not be shown
    an older run's fit without being told)."""
    runs = [p for p in root.glob("*/*") if (p / "config.resolved.toml").is_file() or (p / "results.jsonl").is_file()]
    notes = []
    for run in sorted(runs, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True):
        if not _has_results(run):
            notes.append(f"skipped {run}: {_why_empty(run)}")
        elif _status(run) == "failed":
            notes.append(f"skipped {run}: this run failed (see meta.json); pass it as a SOURCE to fit the units "
                         f"it finished")
        else:
            return run, notes
    latest = f" (the latest, {notes[0].removeprefix('skipped ')})" if notes else ""
    raise DataError(f"no run with finished units under {root}/*/*/{latest}; pass a SOURCE or run "
                    f"`newllm-kit run` first")


def check_comparable(points: list[Point], allow_mixed: bool, warnings: list[str] | None = None) -> list[str]:
    """Refuse to mix sources whose data fingerprints (corpus, tokenizer, split, embedding table) differ.

    Returns the warnings it adds; they are also appended to `warnings` when given.
    """
    first: dict[str, str] = {}  # fingerprint -> first source (in sorted order) that has it
    for p in sorted(points, key=lambda p: (p.source, p.fingerprint or "")):
        if p.fingerprint is not None:
            first.setdefault(p.fingerprint, p.source)
    sources, added = sorted(set(first.values())), []
    unchecked = sorted({p.source for p in points if p.fingerprint is None})
    if unchecked and len({p.source for p in points}) > 1:
        added.append(f"{', '.join(unchecked)}: no data fingerprints, so comparability is not checked")
    if len(first) > 1 and len(sources) > 1:
        message = f"{sources[0]} and {sources[1]} have different data fingerprints and are not comparable"
        if not allow_mixed:
            raise UserError(f"{message}; pass --allow-mixed to combine them anyway")
        added.append(f"{message}; combined anyway (--allow-mixed)")
    if warnings is not None:
        warnings.extend(added)
    return added


def fit_power(model: str, tokens: list[float], ppls: list[float], predict: list[float]) -> Fit:
    """OLS of ln PPL on ln tokens over every point, replicates (seeds) included; t-based intervals
    when there are more points than the line's 2 parameters: a third size, or a second seed."""
    x, y = np.log(np.asarray(tokens, float)), np.log(np.asarray(ppls, float))
    n, distinct, top = len(x), len(set(tokens)), max(tokens)
    if distinct < 2:
        raise DataError(f"model {model}: needs at least 2 distinct token counts to fit (got {distinct})")
    x_mean, xc = float(x.mean()), x - x.mean()
    sxx = float(xc @ xc)
    alpha = float(xc @ (y - y.mean())) / sxx
    intercept = float(y.mean()) - alpha * x_mean
    ss_res, ss_tot = float(np.sum((y - intercept - alpha * x) ** 2)), float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 if ss_tot == 0 or n == 2 else 1.0 - ss_res / ss_tot
    warnings, alpha_ci, scale = [], None, 0.0  # scale: t quantile × residual standard error
    if n >= 3:
        from scipy import stats  # here, not at the top: importing it costs every `run` ~1.5 s

        scale = float(stats.t.ppf(0.975, n - 2)) * math.sqrt(ss_res / (n - 2))
        alpha_ci = (alpha - scale / math.sqrt(sxx), alpha + scale / math.sqrt(sxx))
        if distinct == 2:
            warnings.append(f"model {model}: 2 training sizes with replicates: the interval for α measures "
                            f"seed noise only and cannot show curvature (a third training size can)")
    else:
        warnings.append(f"model {model}: 2 points, R² = 1 by construction; no interval can be estimated (a third "
                        f"training size gives one)")
    predictions = []
    for t in (_number(t, "token count", "--predict") for t in predict):
        log_hat = intercept + alpha * math.log(t)
        half = scale * math.sqrt(1 + 1 / n + (math.log(t) - x_mean) ** 2 / sxx)
        pi = (math.exp(log_hat - half), math.exp(log_hat + half)) if alpha_ci else None
        predictions.append(Prediction(t, math.exp(log_hat), pi, t / top))
        if t > 10 * top:
            warnings.append(f"model {model}: prediction at {t:,.0f} tokens is {t / top:,.0f}× the largest "
                            f"observed count ({top:,.0f}); treat it as an extrapolation")
    return Fit(model, alpha, math.exp(intercept), r2, n, 1 - 2**alpha, alpha_ci, predictions, None, warnings)


def mean_band(tokens: list[float], ppls: list[float], grid: Any) -> tuple[Any, Any] | None:
    """The 95 % confidence band of the fitted line at the token counts `grid` (the uncertainty of
    the law itself, narrower than a prediction interval); None where fit_power gives no interval."""
    x, y = np.log(np.asarray(tokens, float)), np.log(np.asarray(ppls, float))
    n = len(x)
    if n < 3 or len(set(tokens)) < 2:
        return None
    from scipy import stats

    xc = x - x.mean()
    alpha = float(xc @ (y - y.mean())) / float(xc @ xc)
    intercept = float(y.mean()) - alpha * float(x.mean())
    s = math.sqrt(float(np.sum((y - intercept - alpha * x) ** 2)) / (n - 2))
    g = np.log(np.asarray(grid, float))
    half = float(stats.t.ppf(0.975, n - 2)) * s * np.sqrt(1 / n + (g - x.mean()) ** 2 / float(xc @ xc))
    centre = intercept + alpha * g
    return np.exp(centre - half), np.exp(centre + half)


def _huber(r: Any) -> float:
    a = np.abs(r)
    return float(np.where(a <= HUBER_DELTA, 0.5 * a * a, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)).sum())


def fit_offset(model: str, tokens: list[float], ppls: list[float], predict: list[float]) -> OffsetFit:
    """`PPL = E + A·tokens^α`, E ≥ 0, by Huber loss on log residuals (robust to one bad run).

    Starts: for a grid of E below the smallest PPL, log(PPL − E) is linear in log tokens, so OLS
    gives A and α in closed form; the best few grid points are refined with least_squares.
    """
    if len(set(tokens)) < 4:
        raise DataError(f"model {model}: --form offset needs at least 4 distinct token counts "
                        f"(got {len(set(tokens))})")
    from scipy import optimize  # imported on use, like scipy.stats in fit_power

    x, y = np.log(np.asarray(tokens, float)), np.log(np.asarray(ppls, float))

    def log_pred(theta: Any) -> tuple[Any, Any]:
        with np.errstate(divide="ignore"):  # E = 0 is allowed: log 0 = −inf drops out of logaddexp
            return theta[1] + theta[2] * x, np.logaddexp(np.log(theta[0]), theta[1] + theta[2] * x)

    def jacobian(theta: Any) -> Any:  # d/d(E, log A, α) of log(E + A·t^α)
        z, lq = log_pred(theta)
        return np.column_stack([np.exp(-lq), np.exp(z - lq), x * np.exp(z - lq)])

    e = np.linspace(0.0, 0.99, 100)[:, None] * min(ppls)
    ly, xc = np.log(np.exp(y) - e), x - x.mean()
    slopes = (ly - ly.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    starts = np.column_stack([e[:, 0], ly.mean(axis=1) - slopes * x.mean(), slopes])
    costs = [_huber(log_pred(theta)[1] - y) for theta in starts]
    best: Any = None
    lower = [0.0, -np.inf, -np.inf]  # only E is bounded
    for k in np.argsort(costs)[:3]:
        result = optimize.least_squares(lambda theta: log_pred(theta)[1] - y, starts[k], jac=jacobian,
                                        loss="huber", f_scale=HUBER_DELTA, bounds=(lower, np.inf), ftol=1e-12,
                                        xtol=1e-12, gtol=1e-12, max_nfev=1000)
        best = result if best is None or result.cost < best.cost else best
    e_fit, log_a, alpha = (float(v) for v in best.x)
    predictions = [Prediction(t, e_fit + math.exp(log_a) * t**alpha, None, t / max(tokens))
                   for t in (_number(t, "token count", "--predict") for t in predict)]
    return OffsetFit(e_fit, math.exp(log_a), alpha, predictions)


def fit_all(points: list[Point], predict: list[float], form: str = "power") -> ScalingReport:
    """One fit per model, sorted by name; points are sorted first so input order never matters."""
    by_model: dict[str, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.model, p.tokens, p.ppl)):
        by_model.setdefault(p.model, []).append(p)
    report = ScalingReport([], [], form, sorted({p.source for p in points}))
    for model, group in by_model.items():
        tokens, ppls = [p.tokens for p in group], [p.ppl for p in group]
        fit = fit_power(model, tokens, ppls, predict)
        fit.sizes = len(set(tokens))
        fit.seeds = max(tokens.count(t) for t in set(tokens))
        fit.offset = fit_offset(model, tokens, ppls, predict) if form == "offset" else None
        report.fits.append(fit)
        report.warnings.extend(fit.warnings)
    return report


def report_to_json(report: ScalingReport) -> dict[str, Any]:
    """The `--json` document: one entry per model, then all warnings."""
    def preds(items: list[Prediction]) -> list[dict[str, Any]]:
        return [{"tokens": p.tokens, "ppl": p.ppl, "pi": list(p.pi) if p.pi else None,
                 "extrapolation": p.extrapolation} for p in items]

    fits = []
    for f in report.fits:
        entry: dict[str, Any] = {"model": f.model, "alpha": f.alpha, "A": f.A, "r2": f.r2, "points": f.points,
                                 "sizes": f.sizes, "seeds": f.seeds,
                                 "doubling_reduction": f.doubling_reduction,
                                 "alpha_ci": list(f.alpha_ci) if f.alpha_ci else None,
                                 "predictions": preds(f.predictions)}
        o = f.offset  # always present, so readers need not check the form; null for --form power
        entry["offset"] = None if o is None else {"E": o.E, "A": o.A, "alpha": o.alpha,
                                                  "predictions": preds(o.predictions)}
        fits.append(entry)
    return {"sources": list(report.sources), "fits": fits, "warnings": list(report.warnings)}


def doubling_text(reduction: float) -> str:
    """`18.4% lower PPL` or `19.1% higher PPL`: the sign in words, never a negative "lower"."""
    return f"{100 * abs(reduction):.1f}% {'lower' if reduction >= 0 else 'higher'} PPL"


def render(report: ScalingReport, console: Console) -> None:
    """Fit table, predictions with intervals, a short model comparison, then warnings.

    Model names and warnings come from the user's files: escaped, so `[/x]` prints as itself.
    """
    if report.sources:
        console.print(escape(f"source{'s' if len(report.sources) > 1 else ''}: {', '.join(report.sources)}"))
    fits = Table(title="PPL = A · tokens^α (OLS in log space)",
                 caption="n: points (sizes × seeds where replicated); 2× data: PPL change per doubling, 2^α − 1")
    for column in ("Model", "α", "A", "R²", "n", "2× data", "α 95% CI"):  # fits 80 columns
        fits.add_column(column, justify="left" if column == "Model" else "right", no_wrap=column != "α 95% CI")
    for f in report.fits:
        ci = f"{f.alpha_ci[0]:.3f}…{f.alpha_ci[1]:.3f}" if f.alpha_ci else "—"
        fits.add_row(escape(f.model), f"{f.alpha:.4f}", f"{f.A:,.0f}" if f.A >= 1000 else f"{f.A:.1f}", f"{f.r2:.4f}",
                     str(f.points) if f.seeds <= 1 else f"{f.points} ({f.sizes}×{f.seeds})",
                     f"{-100 * f.doubling_reduction:+.1f}%", ci)
    console.print(fits)
    for f in report.fits:
        if f.offset:
            console.print(f"{escape(f.model)}: offset form PPL = {f.offset.E:,.1f} + {f.offset.A:,.1f} · "
                          f"tokens^({f.offset.alpha:.4f})")
    if report.fits and report.fits[0].predictions:
        table = Table(title="Predicted PPL")
        for column in ("Model", "Tokens", "PPL", "95% PI", "× largest observed",
                       *(["Offset form"] if report.form == "offset" else [])):
            table.add_column(column, justify="left" if column == "Model" else "right", no_wrap=column != "95% PI")
        for f in report.fits:
            for i, p in enumerate(f.predictions):
                table.add_row(escape(f.model), f"{p.tokens:,.0f}", f"{p.ppl:,.1f}",
                              f"{p.pi[0]:,.1f} … {p.pi[1]:,.1f}" if p.pi else "—", f"{p.extrapolation:,.1f}",
                              *([f"{f.offset.predictions[i].ppl:,.1f}"] if f.offset else []))
        console.print(table)
    if len(report.fits) > 1:
        steep = min(report.fits, key=lambda f: f.alpha)
        advice = ("compare the CIs before calling it better" if all(f.alpha_ci for f in report.fits) else
                  "not every α has an interval, so the ranking is untested; a third training size gives one")
        console.print(f"Steepest α: [bold]{escape(steep.model)}[/] ({steep.alpha:.4f}); {advice}.")
        for i, p in enumerate(report.fits[0].predictions):
            best = min(report.fits, key=lambda f: f.predictions[i].ppl)
            console.print(f"At {p.tokens:,.0f} tokens the lowest predicted PPL is [bold]{escape(best.model)}[/] "
                          f"({best.predictions[i].ppl:,.1f}).")
    for warning in report.warnings:
        console.print(f"[yellow]warning: {escape(warning)}[/]")
