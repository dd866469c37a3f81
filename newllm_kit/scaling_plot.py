"""The `scaling --plot` figure: measured points, fitted power laws and predictions on log-log axes.

A report figure, not a draft: it names what it shows (experiment and run), explains every mark
in the legend, says when a line rests on two points (exact, so no uncertainty can be drawn), writes
beside each prediction past the data how far it extrapolates, says when a band is clipped at the
frame, and labels ticks as plain numbers (200, 300; 30k, 1M), which is how PPLs and token counts
are quoted.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .scaling import Point, Prediction, ScalingReport, mean_band

# Tick multipliers per decade, coarse to fine: the first that puts 3 ticks on the axis is used;
# an axis narrower than all of them gets evenly spaced round numbers.
TICK_STEPS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values between lo and hi: 3 or more where a log scale has them, else up to 8 evenly spaced."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for steps in TICK_STEPS:
        ticks = [float(f"{s * 10.0**d:.6g}") for d in decades for s in steps if lo <= s * 10.0**d <= hi]
        if len(ticks) >= 3:
            return ticks
    exponent = math.floor(math.log10(hi - lo)) - 2
    while True:
        for step in (10.0**exponent, 2 * 10.0**exponent, 5 * 10.0**exponent):
            ticks = [float(f"{k * step:.6g}") for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
            if len(ticks) <= 8:
                return ticks
        exponent += 1


def log_limits(values: list[float], pad: float = 0.1, least_ratio: float = 1.5) -> tuple[float, float]:
    """Axis limits around the values: a margin of `pad` of the log span on each side, and at least
    a `least_ratio` span, so two close points sit inside the frame instead of in its corners."""
    lo, hi = math.log(min(values)), math.log(max(values))
    widen = max(math.log(least_ratio) - (hi - lo), 0.0) / 2
    margin = pad * (hi - lo + 2 * widen)
    return math.exp(lo - widen - margin), math.exp(hi + widen + margin)


def tokens_label(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def title(sources: list[str]) -> str:
    """`quickstart, run 20261201-…` for a file in a run directory (runs/<experiment>/<run>/), else its name."""
    names = []
    for source in sources:
        path = Path(source)
        in_run = (path.parent / "config.resolved.toml").is_file()
        names.append(f"{path.parent.parent.name}, run {path.parent.name}" if in_run else path.name)
    return "; ".join(names) or "scaling fit"


def extrapolation_label(prediction: Prediction) -> str | None:
    """The words beside a prediction beyond the largest measured size, so the picture says what the
    text warns about: "extrapolated ×82"."""
    factor = prediction.extrapolation
    if factor <= 1:
        return None
    return f"extrapolated ×{factor:,.0f}" if factor >= 10 else f"extrapolated ×{factor:.1f}"


def plot(report: ScalingReport, points: list[Point], path: Path) -> None:
    """Write the figure as a PNG (atomically: readers never see half a file)."""
    if path.is_dir():
        raise UserError(f"--plot: {path} is a folder; give a file name such as {path / 'fit.png'}")
    if not path.parent.is_dir():
        raise UserError(f"--plot: folder {path.parent} does not exist; create it or choose another path")
    save_png(scaling_figure(report, points), path, "--plot")


def scaling_figure(report: ScalingReport, points: list[Point]) -> Any:
    """The figure `plot` writes: one axes, every mark explained in the legend or written beside it."""
    figure = new_figure((8.5, 5), "--plot")
    from matplotlib.lines import Line2D  # after new_figure, which says how to install matplotlib
    ax = figure.add_subplot()
    xs: list[float] = []
    ys: list[float] = []
    handles: list[Any] = []
    bands: dict[str, tuple[float, float]] = {}  # model → its band's lowest and highest PPL
    for index, f in enumerate(report.fits):
        own = [p for p in points if p.model == f.model]
        seen = [p.tokens for p in own]
        every = seen + [p.tokens for p in f.predictions]
        ci = f"95% CI {f.alpha_ci[0]:.3f} … {f.alpha_ci[1]:.3f}" if f.alpha_ci else "2 sizes: exact, no CI"
        (dots,) = ax.plot(seen, [p.ppl for p in own], "o", label=f"{f.model}: α = {f.alpha:.3f} ({ci})")
        color = dots.get_color()
        lo, hi = min(seen), max(seen)
        for start, stop, style in ((min(every), lo, "--"), (lo, hi, "-"), (hi, max(every), "--")):
            line = np.geomspace(start, stop, 50)  # solid over the data, dashed where it extrapolates
            ax.plot(line, f.A * line**f.alpha, style, color=color)
        grid = np.geomspace(lo, hi, 50)
        if band := mean_band(seen, [p.ppl for p in own], grid):
            ax.fill_between(grid, *band, color=color, alpha=0.15, linewidth=0)
            bands[f.model] = (float(min(band[0])), float(max(band[1])))
        for p in f.predictions:
            err = [[p.ppl - p.pi[0]], [p.pi[1] - p.ppl]] if p.pi else None
            ax.errorbar([p.tokens], [p.ppl], yerr=err, fmt="D", color=color, capsize=3, mfc="none")
            if label := extrapolation_label(p):
                ax.annotate(label, (p.tokens, p.ppl), xytext=(-6, 8 + 11 * index), textcoords="offset points",
                            ha="right", fontsize=8, color=color)  # staggered: predictions often share a size
            ys.extend(p.pi or ())
        handles.append(dots)
        xs.extend(every)
        ys.extend([p.ppl for p in own] + [p.ppl for p in f.predictions])
    key: dict[str, dict[str, Any]] = {"measured" + (" (one dot per seed)" if any(f.seeds > 1 for f in report.fits)
                                                   else ""): {"marker": "o", "linestyle": "none"},
                                      "fit over the measured sizes": {"linestyle": "-"}}
    if any(f.alpha_ci for f in report.fits):
        key["95% confidence band of the fit"] = {"linewidth": 6, "alpha": 0.15}
    if any(f.predictions for f in report.fits):
        pi = any(p.pi for f in report.fits for p in f.predictions)
        key["fit, extrapolated"] = {"linestyle": "--"}
        key["prediction" + (" with 95% PI" if pi else "")] = {"marker": "D", "linestyle": "none", "mfc": "none"}
    handles += [Line2D([], [], color="0.3", label=name, **style) for name, style in key.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    exact = [f.model for f in report.fits if f.alpha_ci is None]
    seed_only = [f.model for f in report.fits if f.alpha_ci is not None and f.sizes == 2]
    if exact:
        ax.set_title(f"{', '.join(exact)}: 2 training sizes, which any line fits exactly, so no uncertainty can "
                     f"be shown; a third size gives an interval", fontsize=8, color="0.35", wrap=True)
    elif seed_only:
        ax.set_title(f"{', '.join(seed_only)}: 2 training sizes × several seeds; the band shows seed noise, not "
                     f"curvature (a third size can)", fontsize=8, color="0.35", wrap=True)
    figure.suptitle(f"Validation PPL vs training tokens: {title(report.sources)}", fontsize=11)
    ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="validation PPL")
    if xs:
        (x_lo, x_hi), (y_lo, y_hi) = log_limits(xs), log_limits(ys)
        ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi))
        ax.set_xticks(ticks := log_ticks(x_lo, x_hi), [tokens_label(t) for t in ticks])
        ax.set_yticks(ticks := log_ticks(y_lo, y_hi), [f"{t:,g}" for t in ticks])
        ax.minorticks_off()
        if wide := band_note(bands, (y_lo, y_hi)):
            ax.text(0.99, 0.01, wide, transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.35",
                    wrap=True)
    ax.grid(True, alpha=0.3)
    return figure


def band_note(bands: dict[str, tuple[float, float]], limits: tuple[float, float]) -> str | None:
    """Axis limits follow the points, not the bands: a loose fit's band is clipped at the frame, and
    this note says so with its true span, instead of a panel shaded edge to edge without a word."""
    wide = [f"{model}: PPL {lo:,.0f}…{hi:,.0f}" for model, (lo, hi) in bands.items()
            if lo < limits[0] or hi > limits[1]]
    return f"95% band wider than the axes, clipped ({'; '.join(wide)})" if wide else None


INSTALL = "pip install 'newllm-kit[plot]'"


def new_figure(size: tuple[float, float], what: str) -> Any:
    """A matplotlib Figure on the Agg backend, without touching pyplot's global state; a one-line
    UserError saying how to install matplotlib when it is missing (`what` names the command)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"{what} needs matplotlib: {INSTALL}") from None
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def file_mode() -> int:
    """What `open()` would give a new file under the current umask (reading the umask means setting it,
    so it is set back at once): mkstemp alone makes 0600 files, which README does not promise."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def save_png(figure: Any, path: Path, what: str) -> None:
    """Write the figure as a PNG atomically (a temporary file beside the target, then a rename), so
    readers never see half a file; it gets the umask's permissions like every other file the kit writes."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            figure.savefig(handle, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # no permission, a full disk
            raise UserError(f"{what}: cannot write {path}: {error.strerror or error}") from None
        raise
