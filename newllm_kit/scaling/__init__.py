"""Scaling-law fits of validation PPL against training tokens, with honest uncertainty.

`PPL = A · tokens^α` is fitted by OLS in log space. Intervals are reported only when the data
can support them (≥ 3 distinct token counts): two points always fit exactly. The offset form
`PPL = E + A · tokens^α` (Huber loss in log space) is shown beside the power law, never instead.
Everything here is pure; the CLI only formats and prints.

`points` reads the inputs, `fit` and `offset` fit the two forms, `report` holds the results and
prints them.
"""

from __future__ import annotations

from .fit import fit_all, fit_power, mean_band
from .offset import HUBER_DELTA, fit_offset
from .points import Point, check_comparable, latest_run_dir, load_points, series
from .report import Fit, OffsetFit, Prediction, ScalingReport, doubling_text, render, report_to_json

__all__ = [
    "HUBER_DELTA",
    "Fit",
    "OffsetFit",
    "Point",
    "Prediction",
    "ScalingReport",
    "check_comparable",
    "doubling_text",
    "fit_all",
    "fit_offset",
    "fit_power",
    "latest_run_dir",
    "load_points",
    "mean_band",
    "render",
    "report_to_json",
    "series",
]
