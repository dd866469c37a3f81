"""The offset form `PPL = E + A · tokens^α`: an irreducible PPL E plus a power law, fitted with a
Huber loss on log residuals. Reported beside the power law, never instead, for each model with ≥ 4 sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import DataError
from .points import positive_number
from .report import OffsetFit, Prediction

OFFSET_SIZES = 4  # distinct token counts: E, A and α, and one to spare so the fit is not exact
HUBER_DELTA = 1e-3  # on log-PPL residuals, as in Chinchilla-style fits: nearly L1 beyond 0.1 %


def _huber(r: Any) -> float:
    a = np.abs(r)
    return float(np.where(a <= HUBER_DELTA, 0.5 * a * a, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)).sum())


def fit_offset(model: str, tokens: list[float], ppls: list[float], predict: list[float]) -> OffsetFit:
    """`PPL = E + A·tokens^α`, E ≥ 0, by Huber loss on log residuals (robust to one bad run).

    Starts: for a grid of E below the smallest PPL, log(PPL − E) is linear in log tokens, so OLS
    gives A and α in closed form; the best few grid points are refined with least_squares.
    """
    if len(set(tokens)) < OFFSET_SIZES:
        raise DataError(f"model {model}: --form offset needs at least {OFFSET_SIZES} distinct token counts "
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
                   for t in (positive_number(t, "token count", "--predict") for t in predict)]
    return OffsetFit(e_fit, math.exp(log_a), alpha, predictions)
