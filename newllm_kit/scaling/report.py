"""What a scaling fit reports: the fit records, the `--json` document, and the tables and
comparisons `newllm-kit scaling` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


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
                              *([f"{f.offset.predictions[i].ppl:,.1f}" if f.offset else "—"]
                                if report.form == "offset" else []))
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
