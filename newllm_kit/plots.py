"""`newllm-kit plot RUN_DIR`: the pictures of a run that a report needs, as PNGs.

- `unit-<unit>.png`: one panel per phase its recipe logged, in the order logged. An epoch phase (rows with
  `epoch`) shows train and validation loss, the record's best epoch starred on the unit's last one; an
  iteration phase (rows with `iteration`) shows its loss and, where the rows have a `rate`, that share in % on
  a second axis, with the record's `<phase>_target_rate` as a line and its `<phase>_rate_note` (what the
  rate measures, e.g. a first pass compared with its own starting point) as a caption;
- `model-<model>.png`: the same curves of every size and seed of one model (or sweep variant), overlaid;
- `scaling.png`: validation PPL against training tokens with each fit and its band (scaling_plot's figure);
- `scaling-flops.png`: validation PPL against training FLOPs (`newllm_kit.flops`), log-log, every unit a dot
  and each model's sizes joined through their means over seeds: the compute-matched view beside the
  data-matched one (no fit: the FLOPs of a size vary with the iterations and epochs it ran). Drawn where
  some record has FLOPs; a unit without them (an older run) is left out and the figure says how many;
- `sweep-<key>.png`: for a sweep, val PPL, the configured validation metrics and the recipes' averaged
  columns against each swept key, mean ± 95 % interval.

Curves come from metrics.jsonl; where a resumed unit logged a step twice, the later attempt's row counts.
The core knows no recipe: phase names, and which phases exist, are whatever the recipe logged.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from .config import read_toml
from .errors import DataError, UserError
from .flops import flops_text, train_flops
from .report import Shown, metric_columns, metric_key, recipe_columns
from .result_sources import check_sources, load_records
from .rundir import RunDir
from .scaling import Point, fit_all, series
from .scaling.points import _has_results, _why_empty
from .scaling_plot import log_limits, log_ticks, new_figure, save_png
from .scaling_plot import plot as plot_scaling
from .stats import t_interval
from .units import Unit

WHAT = "newllm-kit plot"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")
STEP_KEYS = ("iteration", "epoch")  # what a metrics row counts; the key names the kind of phase
CURVE_KEYS = {"iteration": ("loss", "rate"), "epoch": ("train_loss", "val_loss")}  # what each kind's panel draws
NO_CURVES = "no curves: this unit logged no epoch/iteration with a loss"
LOSS_LABEL = "cross-entropy (nats per token)"
RATE_LABEL = "share converged (%)"
Curves = dict[str, list[dict[str, Any]]]  # one unit's rows by phase, in the order the phases were first logged


def write_plots(run_dir: Path, out: Path | None = None, allow_mixed: bool = False) -> list[Path]:
    """Every figure of the run into `out` (default RUN_DIR/plots); returns the files written."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory; give one under runs/<experiment>/")
    if not _has_results(run_dir):
        raise DataError(f"{run_dir}: {_why_empty(run_dir)}")
    if out is None:  # the run's own folder: a plots/ link leading out of the run directory is refused
        out = run_dir / "plots"
        RunDir(run_dir).inside(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out: cannot create {out}: {error.strerror or error}; choose another folder") from None
    new_figure((1, 1), WHAT)  # says how to install matplotlib before any work
    records, _ = load_records([run_dir])
    check_sources(records, allow_mixed)  # results on different data share no axis
    curves = run_curves(run_dir)
    seeded = _seeded(run_dir, records)
    written = []
    for r in records:
        unit = unit_id(r, seeded)
        written.append(unit_plot(r, unit, curves.get(unit, {}), out))
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_series.setdefault(series(r), []).append(r)
    for name, group in by_series.items():
        written.append(_save(model_figure(name, group, curves, seeded), out / f"model-{_file_name(name)}.png"))
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]), None, str(run_dir / "results.jsonl"),
                    r.get("seed")) for r in records if _number(r.get("val_ppl"))]  # null: no PPL to fit
    fittable = [p for p in points if len({q.tokens for q in points if q.model == p.model}) >= 2]
    if fittable:
        plot_scaling(fit_all(fittable, []), fittable, out / "scaling.png")
        written.append(out / "scaling.png")
    if any(train_flops(r) is not None and _number(r.get("val_ppl")) for r in records):
        written.append(_save(flops_figure(records, run_dir.name), out / "scaling-flops.png"))
    keys = list(dict.fromkeys(k for r in records for k in r.get("sweep", {})))
    metrics = sweep_metrics(run_dir, records)
    for key in keys:
        written.append(_sweep_figure(records, key, keys, metrics, out / f"sweep-{_file_name(key)}.png"))
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


def run_curves(run_dir: Path) -> dict[str, Curves]:
    """A run's curves: its metrics.jsonl, then the metrics of units that ran as jobs."""
    return read_curves(run_dir / "metrics.jsonl", *sorted(run_dir.glob("units/*/metrics.jsonl")))


def read_curves(*paths: Path) -> dict[str, Curves]:
    """metrics.jsonl files (a run's own, then its units' as jobs wrote them) as {unit: {phase: rows by
    step}}, phases in the order first logged; a step logged again by a resumed attempt replaces the
    earlier row, and a line cut by a kill is skipped."""
    lines: list[str] = []
    for path in paths:
        try:
            lines += path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read ({error})") from None
    steps: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or "unit" not in row or "phase" not in row:
            continue
        if (key := _step_key(row)) is not None:
            steps.setdefault((str(row["unit"]), str(row["phase"])), {})[float(row[key])] = row
    curves: dict[str, Curves] = {}
    for (unit, phase), by_step in steps.items():  # dicts keep insertion order: phases as first logged
        curves.setdefault(unit, {})[phase] = [by_step[step] for step in sorted(by_step)]
    return curves


def _step_key(row: dict[str, Any]) -> str | None:
    return next((key for key in STEP_KEYS if _number(row.get(key))), None)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _phases(units: list[Curves]) -> dict[str, str]:
    """Each phase of these units → "iteration" or "epoch", by the step its rows count, in the order first
    logged; a phase whose rows count neither, or carry none of the values its panel draws (CURVE_KEYS),
    is left out, so it never becomes a blank panel."""
    kinds: dict[str, str] = {}
    for curves in units:
        for phase, rows in curves.items():
            key = _step_key(rows[0]) if rows else None
            if key is not None and any(_has(rows, value) for value in CURVE_KEYS[key]):
                kinds.setdefault(phase, key)
    return kinds


def _best_phase(curves: Curves) -> str | None:
    """The phase a record's `best_epoch` counts in: the unit's last epoch phase (its final training)."""
    return next((p for p, kind in reversed(_phases([curves]).items()) if kind == "epoch"), None)


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", text).strip("-") or "unnamed"


def _xy(rows: list[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    kept = [r for r in rows if _number(r.get(x)) and _number(r.get(y))]
    return [r[x] for r in kept], [scale * r[y] for r in kept]


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(_number(r.get(key)) for r in rows)


def _panels(figure: Any, count: int, empty: str = NO_CURVES) -> list[Any]:
    """`count` side-by-side axes with a grid and whole-number steps; with none, one axes that says `empty`
    across it instead of a blank panel."""
    axes = list(figure.subplots(1, max(count, 1), squeeze=False)[0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if count == 0:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, f"{empty}\n(see docs/writing-plugins.md, Progress and metrics.jsonl)",
                     ha="center", va="center", transform=axes[0].transAxes, fontsize=11, wrap=True)
    return axes[:count]


def _save(figure: Any, path: Path) -> Path:
    save_png(figure, path, WHAT)
    return path


def unit_plot(record: dict[str, Any], unit: str, curves: Curves, out: Path) -> Path:
    """`out/unit-<unit>.png`, the unit's figure: what `write_plots` draws, and what trackers get when the
    unit finishes."""
    return _save(unit_figure(record, unit, curves), out / f"unit-{_file_name(unit)}.png")


def unit_figure(record: dict[str, Any], unit: str, curves: Curves) -> Any:
    """One unit's figure: a titled panel per phase it logged (twin axes carry no title)."""
    phases = _phases([curves])
    figure = new_figure((max(5.5 * len(phases), 9.0), 4.2), WHAT)  # one panel still fits the title
    best_phase = _best_phase(curves)
    for ax, (phase, kind) in zip(_panels(figure, len(phases)), phases.items(), strict=True):
        if kind == "iteration":
            _iteration_panel(ax, phase, curves[phase], record.get(f"{phase}_target_rate"))
        else:
            _epoch_panel(ax, phase, curves[phase], record.get("best_epoch") if phase == best_phase else None)
    variant = f" [{record['variant']}]" if record.get("variant") else ""
    figure.suptitle(f"{unit}: model {record['model']}{variant}, {record['samples']:,} documents "
                    f"({record['train_tokens']:,} tokens), seed {record.get('seed', '?')}; "
                    f"final val PPL {_ppl_text(record.get('val_ppl'))}", fontsize=11)
    _rate_caption(figure, [record], phases)
    return figure


def _rate_caption(figure: Any, records: list[dict[str, Any]], phases: dict[str, str]) -> None:
    """Under the figure, what an iteration phase's share converged measures where the recipe recorded a
    note on it (`<phase>_rate_note`: e.g. a first pass compared with its own starting point)."""
    notes = dict.fromkeys(f"{phase}: {r[f'{phase}_rate_note']}" for phase, kind in phases.items()
                          if kind == "iteration" for r in records if isinstance(r.get(f"{phase}_rate_note"), str))
    if notes:
        figure.supxlabel("\n".join(textwrap.fill(note, 150) for note in notes), fontsize=8)


def _ppl_text(value: Any) -> str:
    """A record's PPL, or what its null means: the unit evaluated nothing (or its PPL overflowed)."""
    return f"{value:.1f}" if _number(value) else "none recorded"


def _iteration_panel(ax: Any, phase: str, rows: list[dict[str, Any]], target: Any) -> None:
    """Loss per iteration; the share of converged tokens, and its target, on a second axis in %."""
    handles = ax.plot(*_xy(rows, "iteration", "loss"), "-o", ms=3, color="C0", label="loss")
    if _has(rows, "rate"):
        rate_ax = ax.twinx()
        handles += rate_ax.plot(*_xy(rows, "iteration", "rate", 100.0), "-s", ms=3, color="C1",
                                label="share converged")
        if _number(target):
            handles.append(rate_ax.axhline(100 * target, color="C1", linestyle=":",
                                           label=f"target ({100 * target:.0f}%)"))
        rate_ax.set(ylabel=RATE_LABEL, ylim=(0, 105))
    ax.set(xlabel=f"{phase} iteration", ylabel="loss", title=f"{phase}: loss per iteration")
    ax.legend(handles=handles, loc="center right", fontsize=8)


def held_out(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The stream an epoch phase early-stopped on, as its rows name it: ("dev", "development") where the
    run had a development split, else ("val", "validation")."""
    return ("dev", "development") if any("dev_loss" in r for r in rows) else ("val", "validation")


def _epoch_panel(ax: Any, phase: str, rows: list[dict[str, Any]], best_epoch: Any) -> None:
    """Train and held-out (validation or development) loss per epoch, `best_epoch` (None: not this
    phase's) starred."""
    key, name = held_out(rows)
    ax.plot(*_xy(rows, "epoch", "train_loss"), "-o", ms=3, color="C2", label="train")
    ax.plot(*_xy(rows, "epoch", f"{key}_loss"), "-o", ms=3, color="C3", label=name)
    best = next((r for r in rows if best_epoch is not None and r.get("epoch") == best_epoch
                 and _number(r.get(f"{key}_loss"))), None)
    if best is not None:
        ppl = f": {key} PPL {best[f'{key}_ppl']:.1f}" if _number(best.get(f"{key}_ppl")) else ""
        ax.plot([best["epoch"]], [best[f"{key}_loss"]], "*", ms=14, color="C3", mec="black",
                label=f"best epoch ({best['epoch']}{ppl})")
    ax.set(xlabel=f"{phase} epoch", ylabel=LOSS_LABEL, title=f"{phase}: train and {name} loss")
    ax.legend(fontsize=8)


def model_figure(name: str, group: list[dict[str, Any]], curves: dict[str, Curves], seeded: bool) -> Any:
    """Every size and seed of one model overlaid: a titled panel per (phase, quantity) any of its units
    logged: an iteration phase's loss and share converged, an epoch phase's validation loss (train faint)."""
    group = sorted(group, key=lambda r: (r["samples"], r.get("seed", 0)))
    units = [curves.get(unit_id(r, seeded), {}) for r in group]
    phases = _phases(units)
    quantities: list[tuple[str, str]] = []
    for phase, kind in phases.items():
        if kind == "epoch":
            quantities.append((phase, "val_loss"))
        else:
            quantities.append((phase, "loss"))
            if any(_has(u.get(phase, []), "rate") for u in units):
                quantities.append((phase, "rate"))
    figure = new_figure((4.4 * max(len(quantities), 1) + 1.6, 4.4), WHAT)
    axes = _panels(figure, len(quantities), "no curves: no unit of this model logged an epoch/iteration with a loss")
    sizes = sorted({r["samples"] for r in group})
    seeds = sorted({r.get("seed", 0) for r in group})
    for r, unit in zip(group, units, strict=True):
        color = f"C{sizes.index(r['samples']) % 10}"
        style = LINESTYLES[seeds.index(r.get("seed", 0)) % len(LINESTYLES)]
        label = f"{r['samples']:,} docs" + (f", seed {r['seed']}" if seeded else "")
        best_phase = _best_phase(unit)
        for ax, (phase, quantity) in zip(axes, quantities, strict=True):
            rows = unit.get(phase, [])
            if quantity != "val_loss":
                scale = 100.0 if quantity == "rate" else 1.0
                ax.plot(*_xy(rows, "iteration", quantity, scale), style, marker="o", ms=3, color=color, label=label)
                continue
            key = held_out(rows)[0]
            ax.plot(*_xy(rows, "epoch", f"{key}_loss"), style, marker="o", ms=3, color=color, label=label)
            ax.plot(*_xy(rows, "epoch", "train_loss"), style, color=color, alpha=0.35, linewidth=1)
            best = next((row for row in rows if row.get("epoch") == r.get("best_epoch")), None)
            if phase == best_phase and best is not None and _number(best.get(f"{key}_loss")):
                ax.plot([best["epoch"]], [best[f"{key}_loss"]], "*", ms=11, color=color, mec="black")
    for ax, (phase, quantity) in zip(axes, quantities, strict=True):
        if quantity == "loss":
            ax.set(xlabel=f"{phase} iteration", ylabel="loss", title=f"{phase}: loss")
        elif quantity == "rate":
            ax.set(xlabel=f"{phase} iteration", ylabel=RATE_LABEL, ylim=(0, 105), title=f"{phase}: share converged")
        else:
            ax.set(xlabel=f"{phase} epoch", ylabel=LOSS_LABEL,
                   title=f"{phase}: early-stopping loss (bold), train (faint), ★ best")
    if axes:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    figure.suptitle(f"Training curves of model {name}: every size" + (" and seed" if seeded else ""), fontsize=11)
    _rate_caption(figure, group, phases)
    return figure


def flops_figure(records: list[dict[str, Any]], name: str) -> Any:
    """Validation PPL against training FLOPs, log-log: a dot per unit, each model's (or variant's) sizes
    joined in order of compute through the means over their seeds."""
    figure = new_figure((8.5, 5), WHAT)
    ax = figure.add_subplot()
    drawn = [r for r in records if train_flops(r) is not None and _number(r.get("val_ppl")) and r["val_ppl"] > 0]
    by_series: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for r in drawn:
        by_series.setdefault(series(r), {}).setdefault(r["samples"], []).append((train_flops(r) or 0.0, r["val_ppl"]))
    for i, (label, sizes) in enumerate(by_series.items()):
        color, points = f"C{i % 10}", [p for group in sizes.values() for p in group]
        ax.plot([x for x, _ in points], [y for _, y in points], MARKERS[i % len(MARKERS)], ms=5, color=color,
                alpha=0.6, label=label)
        means = sorted((math.fsum(x for x, _ in g) / len(g), math.fsum(y for _, y in g) / len(g))
                       for g in sizes.values())
        ax.plot([x for x, _ in means], [y for _, y in means], "-", color=color)
    xs, ys = [train_flops(r) or 0.0 for r in drawn], [float(r["val_ppl"]) for r in drawn]
    (x_lo, x_hi), (y_lo, y_hi) = log_limits(xs), log_limits(ys)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (newllm_kit.flops: matmuls, 3× forward per "
                                              "training token)", ylabel="validation PPL", xlim=(x_lo, x_hi),
           ylim=(y_lo, y_hi))
    ax.set_xticks(ticks := log_ticks(x_lo, x_hi), [flops_text(t) for t in ticks])
    ax.set_yticks(ticks := log_ticks(y_lo, y_hi), [f"{t:,g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    left_out = len(records) - len(drawn)
    if left_out:
        ax.set_title(f"{left_out} unit(s) without recorded FLOPs or PPL left out", fontsize=8, color="0.35")
    figure.suptitle(f"Validation PPL vs training FLOPs (each size: dots per seed, line through the means): {name}",
                    fontsize=11)
    return figure


def sweep_metrics(run_dir: Path, records: list[dict[str, Any]]) -> list[Shown]:
    """What a sweep figure plots, one panel each: val PPL, the run's configured validation metrics, then the
    columns the recipes declare as averaged over seeds; only those some record has a number for."""
    candidates = [Shown("val_ppl", "validation PPL"),
                  *(c for c in metric_columns(_metric_info(run_dir, records)) if c.key.startswith("val_")),
                  *(c for c in recipe_columns(records) if c.mean)]
    found: dict[str, Shown] = {}
    for c in candidates:
        if any(_number(r.get(c.key)) for r in records):
            found.setdefault(c.key, c)
    return list(found.values())


def _metric_info(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configured metrics as summary.json describes them (its units say which are fractions, drawn in %);
    without it, only the names the records carry."""
    try:
        info = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("metrics")
    except (OSError, ValueError, AttributeError):
        info = None
    if isinstance(info, list) and all(isinstance(m, dict) and "name" in m and "key" in m for m in info):
        return info
    names = dict.fromkeys(name for r in records for name in r.get("metrics") or {})
    return [{"name": name, "key": metric_key(name)} for name in names]


def _sweep_figure(records: list[dict[str, Any]], key: str, keys: list[str], metrics: list[Shown],
                  path: Path) -> Path:
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
    figure = new_figure((5 * len(metrics) + 2, 4.4), WHAT)
    seeds = max(len(group) for line in lines.values() for group in line.values())
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        scale = 100.0 if metric.percent else 1.0
        for i, (name, by_value) in enumerate(lines.items()):
            xs, ys, errors = [], [], []
            for value in values:
                got = [scale * float(r[metric.key]) for r in by_value.get(value, []) if _number(r.get(metric.key))]
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
        ax.set(xlabel=key, ylabel=metric.header + (" (%)" if metric.percent else ""), title=metric.header)
        ax.set_xticks(list(positions.values()), [str(json.loads(v)) for v in values])
        ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    bars = f"mean ± 95% t-interval over {seeds} seeds" if seeds > 1 else "one seed: no error bars"
    figure.suptitle(f"Sweep over {key} at {largest:,} documents ({bars})", fontsize=11)
    save_png(figure, path, WHAT)
    return path
