"""`PPL = A · tokens^α` by OLS in log space, per model: intervals only where the data can support
them, predictions with prediction intervals, and the confidence band the plots draw.
"""

from __future__ import annotations

import math
from collections import Counter
from operator import attrgetter
from typing import Any

import numpy as np

from ..errors import DataError
from .offset import OFFSET_SIZES, fit_offset
from .points import Point, positive_number
from .report import Fit, Prediction, ScalingReport


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
    for t in (positive_number(t, "token count", "--predict") for t in predict):
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


def fit_all(points: list[Point], predict: list[float], form: str = "power") -> ScalingReport:
    """One fit per model, sorted by name; each model's points are sorted by tokens and PPL first so
    input order never matters. numpy groups and sorts them: a table may hold millions of rows."""
    names = list(map(attrgetter("model"), points))
    models = sorted(set(names))
    code = {model: i for i, model in enumerate(models)}
    codes = np.fromiter(map(code.__getitem__, names), np.intp, len(names))
    x = np.fromiter(map(attrgetter("tokens"), points), float, len(points))
    y = np.fromiter(map(attrgetter("ppl"), points), float, len(points))
    order = np.lexsort((y, x, codes))
    ends = np.searchsorted(codes[order], np.arange(len(models) + 1))
    report = ScalingReport([], [], form, sorted(set(map(attrgetter("source"), points))))
    for i, model in enumerate(models):
        group = order[ends[i]:ends[i + 1]]
        tokens, ppls = x[group].tolist(), y[group].tolist()
        try:
            fit = fit_power(model, tokens, ppls, predict)
        except OverflowError:  # values near the float maximum: A or a prediction is beyond any float
            raise DataError(f"model {model}: the fit overflows a float (PPL {min(ppls):.3g} … {max(ppls):.3g} "
                            f"over {min(tokens):.3g} … {max(tokens):.3g} tokens); check those values") from None
        fit.sizes = len(set(tokens))
        fit.seeds = max(Counter(tokens).values())  # Counter: tokens.count per size is quadratic in the rows
        if form == "offset" and fit.sizes >= OFFSET_SIZES:
            fit.offset = fit_offset(model, tokens, ppls, predict)
        elif form == "offset":
            fit.warnings.append(f"model {model}: {fit.sizes} training sizes; the offset form needs at least "
                                f"{OFFSET_SIZES}, so only the power law is shown")
        report.fits.append(fit)
        report.warnings.extend(fit.warnings)
    if form == "offset" and report.fits and not any(f.offset for f in report.fits):
        sizes = ", ".join(f"{f.model}: {f.sizes}" for f in report.fits)
        raise DataError(f"--form offset needs at least {OFFSET_SIZES} distinct token counts for a model; "
                        f"no model has them ({sizes}); add training sizes or use --form power")
    return report
