"""`newllm-kit plot RUN_DIR`: the pictures of a run that a report needs, as PNGs.

- `unit-<unit>.png`: Phase 1 (loss and share of converged tokens per iteration) and Phase 2
  (train and validation loss per epoch, the best epoch marked) of one unit;
- `model-<model>.png`: the same curves of every size and seed of one model (or sweep variant), overlaid;
- `scaling.png`: validation PPL against training tokens with each fit and its band (scaling_plot's figure);
- `sweep-<key>.png`: for a sweep, PPL and effective ranks against each swept key, mean ± 95 % interval.

Curves come from metrics.jsonl; where a resumed unit logged a step twice, the later attempt's row counts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .compare import load_records
from .config import read_toml
from .errors import DataError, UserError
from .experiment import Unit
from .scaling import Point, _has_results, _why_empty, fit_all, series
from .scaling_plot import new_figure, save_png
from .scaling_plot import plot as plot_scaling
from .stats import t_interval

WHAT = "newllm-kit plot"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")
SWEEP_METRICS = (("val_ppl", "validation PPL", 1.0), ("train_er", "Train ER (% of context width)", 100.0),
                 ("val_er", "Val ER (% of context width)", 100.0))
LOSS_LABEL = "cross-entropy (nats per token)"
PHASE1_LABEL = "Phase-1 loss (MSE + diversity term, unitless)"


def write_plots(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Every figure of the run into `out` (default RUN_DIR/plots); returns the files written."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory; give one under runs/<experiment>/")
    if not _has_results(run_dir):
        raise DataError(f"{run_dir}: {_why_empty(run_dir)}")
    out = out if out is not None else run_dir / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out: cannot create {out}: {error.strerror or error}; choose another folder") from None
    new_figure((1, 1), WHAT)  # says how to install matplotlib before any work
    records, _ = load_records([run_dir])
    curves = read_curves(run_dir / "metrics.jsonl")
    seeded = _seeded(run_dir, records)
    written = []
    for r in records:
        unit = unit_id(r, seeded)
        written.append(_unit_figure(r, unit, curves.get(unit, {}), out / f"unit-{_file_name(unit)}.png"))
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_series.setdefault(series(r), []).append(r)
    for name, group in by_series.items():
        written.append(_model_figure(name, group, curves, seeded, out / f"model-{_file_name(name)}.png"))
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]), None, str(run_dir / "results.jsonl"),
                    r.get("seed")) for r in records]
    fittable = [p for p in points if len({q.tokens for q in points if q.model == p.model}) >= 2]
    if fittable:
        plot_scaling(fit_all(fittable, []), fittable, out / "scaling.png")
        written.append(out / "scaling.png")
    keys = list(dict.fromkeys(k for r in records for k in r.get("sweep", {})))
    for key in keys:
        written.append(_sweep_figure(records, key, keys, out / f"sweep-{_file_name(key)}.png"))
    return written


def unit_id(record: dict[str, Any], seeded: bool) -> str:
    return Unit(record["model"], int(record["samples"]), 0, int(record.get("seed", 0)),
                str(record.get("variant", "")), seeded).id


def _seeded(run_dir: Path, records: list[dict[str, Any]]) -> bool:
    """Several seeds, so unit ids name the seed: from the run's config, else from the records."""
    config = run_dir / "config.resolved.toml"
    if config.is_file():
        seeds = read_toml(config).get("experiment", {}).get("seeds") or []
        return len(seeds) > 1
    return len({r.get("seed") for r in records}) > 1


def read_curves(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """metrics.jsonl as {unit: {phase: rows by step}}; a step logged again by a resumed attempt
    replaces the earlier row, and a line cut by a kill is skipped."""
    steps: dict[tuple[str, str, float], dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "unit" not in row or "phase" not in row:
            continue
        step = row.get("iteration", row.get("epoch"))
        if isinstance(step, int | float):
            steps[(str(row["unit"]), str(row["phase"]), float(step))] = row
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (unit, phase, _), row in sorted(steps.items()):
        curves.setdefault(unit, {}).setdefault(phase, []).append(row)
    return curves


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-") or "unnamed"


def _xy(rows: list[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    kept = [r for r in rows if isinstance(r.get(y), int | float) and math.isfinite(r[y])]
    return [r[x] for r in kept], [scale * r[y] for r in kept]


def _phase1_axes(ax: Any, rows: list[dict[str, Any]], color: Any, style: str, label: str | None,
                 rate_ax: Any) -> None:
    ax.plot(*_xy(rows, "iteration", "loss"), style, marker="o", ms=3, color=color, label=label)
    rate_ax.plot(*_xy(rows, "iteration", "rate", 100.0), style, marker="o", ms=3, color=color, label=label)


def _unit_figure(record: dict[str, Any], unit: str, curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    figure = new_figure((11, 4.2), WHAT)
    loss_ax, phase2_ax = figure.subplots(1, 2)
    rate_ax = loss_ax.twinx()
    phase1 = curves.get("phase1", [])
    (loss_line,) = loss_ax.plot(*_xy(phase1, "iteration", "loss"), "-o", ms=3, color="C0", label="Phase-1 loss")
    (rate_line,) = rate_ax.plot(*_xy(phase1, "iteration", "rate", 100.0), "-s", ms=3, color="C1",
                                label="converged tokens")
    handles = [loss_line, rate_line]
    if isinstance(record.get("phase1_target_rate"), int | float):
        handles.append(rate_ax.axhline(100 * record["phase1_target_rate"], color="C1", linestyle=":",
                                       label=f"target ({100 * record['phase1_target_rate']:.0f}%)"))
    loss_ax.set(xlabel="Phase-1 iteration (pass over the stream)", ylabel=PHASE1_LABEL,
                title="Phase 1: fixed-point training")
    rate_ax.set(ylabel="tokens converged (%)", ylim=(0, 105))
    loss_ax.legend(handles=handles, loc="center right", fontsize=8)
    phase2 = curves.get("phase2", [])
    phase2_ax.plot(*_xy(phase2, "epoch", "train_loss"), "-o", ms=3, color="C2", label="train")
    phase2_ax.plot(*_xy(phase2, "epoch", "val_loss"), "-o", ms=3, color="C3", label="validation")
    best = next((r for r in phase2 if r.get("epoch") == record.get("best_epoch")), None)
    if best is not None:
        phase2_ax.plot([best["epoch"]], [best["val_loss"]], "*", ms=14, color="C3", mec="black",
                       label=f"best epoch ({best['epoch']}: val PPL {best['val_ppl']:.1f})")
    phase2_ax.set(xlabel="Phase-2 epoch", ylabel=LOSS_LABEL, title="Phase 2: next-token training")
    phase2_ax.legend(fontsize=8)
    for ax in (loss_ax, phase2_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    variant = f" [{record['variant']}]" if record.get("variant") else ""
    figure.suptitle(f"{unit}: model {record['model']}{variant}, {record['samples']:,} documents "
                    f"({record['train_tokens']:,} tokens), seed {record.get('seed', '?')}; "
                    f"final val PPL {record['val_ppl']:.1f}", fontsize=11)
    save_png(figure, path, WHAT)
    return path


def _model_figure(name: str, group: list[dict[str, Any]], curves: dict[str, dict[str, list[dict[str, Any]]]],
                  seeded: bool, path: Path) -> Path:
    figure = new_figure((14, 4.4), WHAT)
    loss_ax, rate_ax, phase2_ax = figure.subplots(1, 3)
    sizes = sorted({r["samples"] for r in group})
    seeds = sorted({r.get("seed", 0) for r in group})
    for r in sorted(group, key=lambda r: (r["samples"], r.get("seed", 0))):
        unit = curves.get(unit_id(r, seeded), {})
        color = f"C{sizes.index(r['samples']) % 10}"
        style = LINESTYLES[seeds.index(r.get("seed", 0)) % len(LINESTYLES)]
        label = f"{r['samples']:,} docs" + (f", seed {r['seed']}" if seeded else "")
        _phase1_axes(loss_ax, unit.get("phase1", []), color, style, label, rate_ax)
        phase2 = unit.get("phase2", [])
        phase2_ax.plot(*_xy(phase2, "epoch", "val_loss"), style, marker="o", ms=3, color=color, label=label)
        phase2_ax.plot(*_xy(phase2, "epoch", "train_loss"), style, color=color, alpha=0.35, linewidth=1)
        best = next((row for row in phase2 if row.get("epoch") == r.get("best_epoch")), None)
        if best is not None:
            phase2_ax.plot([best["epoch"]], [best["val_loss"]], "*", ms=11, color=color, mec="black")
    loss_ax.set(xlabel="Phase-1 iteration", ylabel=PHASE1_LABEL,
                title="Phase-1 loss")
    rate_ax.set(xlabel="Phase-1 iteration", ylabel="tokens converged (%)", ylim=(0, 105),
                title="Phase-1 convergence")
    phase2_ax.set(xlabel="Phase-2 epoch", ylabel=LOSS_LABEL,
                  title="Phase 2: validation (bold), train (faint), ★ best")
    for ax in (loss_ax, rate_ax, phase2_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    phase2_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    figure.suptitle(f"Training curves of model {name}: every size" + (" and seed" if seeded else ""), fontsize=11)
    save_png(figure, path, WHAT)
    return path


def _sweep_figure(records: list[dict[str, Any]], key: str, keys: list[str], path: Path) -> Path:
    """Each metric against one swept key at the largest size: one line per model and setting of
    the other swept keys, mean ± 95 % t-interval over the seeds."""
    largest = max(r["samples"] for r in records)
    top = [r for r in records if r["samples"] == largest and key in r.get("sweep", {})]
    values = list(dict.fromkeys(json.dumps(r["sweep"][key]) for r in top))
    numeric = all(isinstance(json.loads(v), int | float) and not isinstance(json.loads(v), bool) for v in values)
    positions = {v: (float(json.loads(v)) if numeric else float(i)) for i, v in enumerate(values)}
    lines: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in top:
        others = ", ".join(f"{k.split('.')[-1]}={r['sweep'][k]}" for k in keys if k != key and k in r["sweep"])
        lines.setdefault(f"{r['model']}" + (f", {others}" if others else ""), {}).setdefault(
            json.dumps(r["sweep"][key]), []).append(r)
    figure = new_figure((5 * len(SWEEP_METRICS) + 2, 4.4), WHAT)
    seeds = max(len(group) for line in lines.values() for group in line.values())
    for ax, (metric, label, scale) in zip(figure.subplots(1, len(SWEEP_METRICS)), SWEEP_METRICS, strict=True):
        for i, (name, by_value) in enumerate(lines.items()):
            xs, ys, errors = [], [], []
            for value in values:
                got = [scale * float(r[metric]) for r in by_value.get(value, [])
                       if isinstance(r.get(metric), int | float)]
                if not got:
                    continue
                interval = t_interval(got)
                xs.append(positions[value])
                ys.append(interval.mean)
                errors.append(interval.half_width or 0.0)
            # later lines get smaller, other markers: lines that coincide (a key that does not act on a
            # metric) stay visible one inside the other
            ax.errorbar(xs, ys, yerr=errors, fmt="-" + MARKERS[i % len(MARKERS)], ms=max(9 - 2 * i, 3), capsize=4,
                        color=f"C{i % 10}", label=name)
        ax.set(xlabel=key, ylabel=label, title=label)
        ax.set_xticks(list(positions.values()), [str(json.loads(v)) for v in values])
        ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    bars = f"mean ± 95% t-interval over {seeds} seeds" if seeds > 1 else "one seed: no error bars"
    figure.suptitle(f"Sweep over {key} at {largest:,} documents ({bars})", fontsize=11)
    save_png(figure, path, WHAT)
    return path
