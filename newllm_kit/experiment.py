"""Running an experiment: every model × training size (× seed × sweep variant), resumable.

One unit = one model at one training size. The corpus is read and tokenised once for the
largest size (smaller sizes are prefixes of the same stream, so every size shares one
tokenizer and one validation set, which keeps their PPLs comparable); then each unit is
seeded and built, its recipe trains and evaluates it, and the core records the configured
metrics and the recipe's own fields. Recipes checkpoint through the core (after every epoch
at least), so `--resume` continues a killed unit; finished units are never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, documents
from .claims import STALE_AFTER_S, Claimed, UnitClaim, describe, inspect, short_claim
from .config import ExperimentConfig
from .corpus import Stream, embedding_provenance, load_streams, rows_stream
from .errors import DataError, PluginError, RunFailed, UserError
from .kept_models import KeptFiles, keep
from .params import check_model_fits
from .protocols import Collectives, EvalOutputs, Placement, Runner, UnitContext, UnitData
from .report import metric_key
from .result_records import UNITS_DIR, read_unit_records
from .resume import PINNED, pin_fingerprints
from .rundir import ORPHANS, STORE_DIR, RunDir
from .scaling import Point, fit_all, report_to_json, series
from .tracking import DISABLED, Tracking, UnitTracking
from .training import ppl, start_unit
from .unit_checkpoint import UnitCheckpoint, share
from .unit_files import CLAIM, META_CLAIM, METRICS, TABLES_CLAIM, claims_dir, unit_dir, write_failure, write_record
from .units import Unit

VARIANTS_DIR = "variants"  # each sweep variant's resolved config, <name>.toml


def plan(config: ExperimentConfig) -> list[Unit]:
    """Every sweep variant × model × training size × seed, in that order."""
    seeds = config.schema.experiment.seed_list()
    sizes = sorted(config.schema.experiment.samples)
    return [Unit(label, n, i, seed, name, len(seeds) > 1)
            for name, variant in config.variant_configs()
            for i, (label, _) in enumerate(variant.models) for n in sizes for seed in seeds]


def record_key(record: dict[str, Any], default_seed: int) -> tuple[str, str, int, int]:
    """The unit a results record belongs to; records written before seeds existed ran `default_seed`."""
    return str(record.get("variant", "")), record["model"], record["samples"], int(record.get("seed", default_seed))


def unit_config(config: ExperimentConfig, unit: Unit) -> ExperimentConfig:
    """The unit's variant config with its seed as `experiment.seed`, which everything inside a unit reads."""
    variant = dict(config.variant_configs())[unit.variant]
    experiment = variant.schema.experiment.model_copy(update={"seed": unit.seed})
    return replace(variant, schema=variant.schema.model_copy(update={"experiment": experiment}))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prefix(stream: Stream, samples: int) -> torch.Tensor:
    end = stream.boundaries[samples - 1][1]
    return stream.ids[:end]


class CorpusCache:
    """The tokenised corpus for this experiment, built once for the largest training size."""

    def __init__(self, config: ExperimentConfig, cache_dir: Path) -> None:
        schema = config.schema
        source = config.data_source.build()
        largest = max(schema.experiment.samples)
        train_rows = range(schema.data.train_start, schema.data.train_start + largest)
        val_rows = range(schema.data.val.start, schema.data.val.start + schema.data.val.count)
        dev = schema.data.dev
        dev_rows = None if dev is None else range(dev.start, dev.start + dev.count)
        self.train, self.val, self.tokenizer, self.fingerprints = load_streams(
            source, schema.data.text, config.tokenizer.build(), train_rows, val_rows, cache_dir, dev_rows
        )
        self.dev = None if dev_rows is None else rows_stream(source, schema.data.text, self.tokenizer, dev_rows,
                                                             cache_dir, "data.dev")
        self.source = source
        for key, stream in (("val", self.val), ("dev", self.dev)):
            if stream is not None and len(stream.ids) < 2:
                raise DataError(f"{config.path}: data.{key}: its rows hold {len(stream.ids)} token(s); need at least 2")

    def train_ids(self, samples: int) -> torch.Tensor:
        ids = _prefix(self.train, samples)
        if len(ids) < 2:
            raise DataError(f"training on {samples} sample(s) gives {len(ids)} token(s); need at least 2")
        return ids


def build_model(config: ExperimentConfig, unit: Unit, vocab_size: int, runner: Placement) -> Any:
    """Seeded construction: the same seed gives the same weights on every machine."""
    check_model_fits(config, unit.index, vocab_size, runner.device)
    seed_everything(config.schema.experiment.seed)
    architecture = config.models[unit.index][1].build()
    model = architecture.build(vocab_size)
    generator = torch.Generator().manual_seed(config.schema.experiment.seed)
    weight = config.embedding.build().load(vocab_size, architecture.embedding_dim, generator)
    if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):  # else: NaN losses, wrong advice
        raise DataError(f"{config.embedding.where}: embedding {config.embedding.component.name!r} gave a table "
                        f"with NaN or infinite values; check its file or source, or choose another embedding.source")
    model.set_embedding(weight, freeze=config.schema.embedding.freeze)
    return model.to(runner.device)


def check_param_groups(config: ExperimentConfig, unit: Unit, model: Any) -> None:
    """Every parameter that requires a gradient is in one of the model's `param_groups()`: a recipe trains
    only those, so one left out (a trainable table forgotten there) would stay untrained without a word."""
    grouped = {id(p) for params in model.param_groups().values() for p in params}
    left = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left:
        choice = config.models[unit.index][1]
        c = choice.component
        raise PluginError(f"{choice.where}: plugin {c.plugin!r}: architecture {c.name!r} builds a model whose "
                          f"trainable parameter {left[0]!r} is in no param_groups() group, so no recipe would "
                          f"train it; add it to a group (or freeze it) in the plugin")


def metric_info(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Each configured metric's name, record key, unit and direction: what the table and results.csv show."""
    info = []
    for choice in config.metrics:
        metric = choice.build()
        info.append({"name": choice.component.name, "key": metric_key(choice.component.name),
                     "unit": str(metric.unit), "direction": str(metric.direction)})
    return info


def metric_values(config: ExperimentConfig, outputs: EvalOutputs) -> dict[str, float]:
    return {choice.component.name: float(choice.build().compute(outputs)) for choice in config.metrics}


def check_outputs(recipe: str, outputs: Any, val_tokens: int, val_documents: int | None = None) -> None:
    """Refuse validation sums no metric could trust: every recipe scores positions 1 … n−1 of the
    validation stream exactly once, so `count` is n − 1, the NLL sum is finite and the hits are at
    most the count; per-document sums, where given, have one row per validation document
    (`val_documents`) and add up to those totals. A recipe that evaluated nothing (the cvfp recipe when
    `solver.skip_phase2_if_identity` skips Phase 2) returns all three zero: its metrics are missing,
    not wrong."""
    where = f"recipe {recipe!r} returned validation outputs"
    if not isinstance(outputs, EvalOutputs):
        raise RunFailed(f"{where} of type {type(outputs).__name__}, not newllm_kit.protocols.EvalOutputs; "
                        f"fix the recipe")
    count, correct, nll = outputs.count, outputs.correct, outputs.nll_sum
    if count == 0 and correct == 0 and nll == 0:
        return
    scored = val_tokens - 1
    problem = None
    if not isinstance(count, int | np.integer) or isinstance(count, bool) or count != scored:
        problem = (f"with count = {count!r}, but the validation stream of {val_tokens:,} tokens has {scored:,} "
                   f"scored positions (1 … n−1, each exactly once)")
    elif not isinstance(nll, int | float) or not math.isfinite(nll):
        problem = f"with nll_sum = {nll!r}, not a finite number"
    elif not isinstance(correct, int | np.integer) or not 0 <= correct <= count:
        problem = f"with correct = {correct!r}, outside 0 … count ({count:,})"
    if problem is None and outputs.documents is not None:
        why = documents.problem(outputs.documents, nll, correct, count, val_documents)
        problem = None if why is None else f"with per-document sums that do not fit: {why}"
    if problem is not None:
        raise RunFailed(f"{where} {problem}; fix the recipe")


def run_unit(config: ExperimentConfig, unit: Unit, corpus: CorpusCache, runner: Runner, run: RunDir,
             progress: Any, attempt: int, claim: UnitClaim | None = None, own_metrics: bool = False,
             identity: dict[str, Any] | None = None, tracker: UnitTracking | None = None) -> dict[str, Any]:
    """Build the unit's model, hand it to its recipe, make the results record from what comes back (with
    the unit's `identity`: seed, sweep variant) and keep the trained model as `experiment.keep_models` says."""
    schema = config.schema
    start_unit(runner, unit.id)
    vocab_size = corpus.tokenizer.vocab_size
    model = build_model(config, unit, vocab_size, runner)
    check_param_groups(config, unit, model)
    recipe_name = config.model_recipes[unit.index]
    recipe = config.recipes[recipe_name].build()
    data = UnitData(train_ids=corpus.train_ids(unit.samples).to(runner.device),
                    val_ids=corpus.val.ids.to(runner.device),
                    train_documents=corpus.train.boundaries[:unit.samples], vocab_size=vocab_size,
                    val_documents=corpus.val.boundaries,
                    dev_ids=None if corpus.dev is None else corpus.dev.ids.to(runner.device),
                    dev_documents=None if corpus.dev is None else corpus.dev.boundaries)
    metrics_file = run.path / UNITS_DIR / unit.id / METRICS if own_metrics else run.path / "metrics.jsonl"
    logged = _Logged(progress, run, unit, attempt, runner.rank == 0, metrics_file, claim, tracker)
    checkpoint = UnitCheckpoint(run, unit.id, runner, logged, (model.vocab_size, model.embedding_dim))
    context = UnitContext(id=unit.id, seed=schema.experiment.seed, runner=runner, progress=logged,
                          checkpoint=checkpoint, scratch=run.inside(run.path / STORE_DIR / unit.id),
                          metrics=lambda outputs: metric_values(config, outputs))
    started = time.perf_counter()
    result = recipe.train(model, data, context)
    seconds = time.perf_counter() - started
    check_outputs(recipe_name, result.val, data.val_ids.numel(), len(corpus.val.boundaries))
    result.val.seed = schema.experiment.seed
    metrics = metric_values(config, result.val)
    counts = model.param_counts()
    groups = model.param_groups()
    embedding = embedding_provenance(config.embedding)
    record: dict[str, Any] = {
        **result.record,  # first: a recipe's field never hides the unit's identity or a metric
        "model": unit.label,
        "samples": unit.samples,
        "train_tokens": int(data.train_ids.numel()),
        "val_tokens": int(data.val_ids.numel()),
        **({} if data.dev_ids is None else {"dev_tokens": int(data.dev_ids.numel())}),
        "early_stopping": "val" if data.dev_ids is None else "dev",
        "recipe": recipe_name,
        "val_ppl": metrics.get("ppl", ppl(result.val.nll_sum / result.val.count) if result.val.count else math.nan),
        "val_acc": metrics.get("accuracy", result.val.correct / result.val.count if result.val.count else math.nan),
        **{metric_key(name): value for name, value in metrics.items()},
        "metrics": metrics,
        "params": {**counts, "trainable": {k: sum(p.numel() for p in v) for k, v in groups.items()}},
        "seconds": {**result.record.get("seconds", {}), "unit": seconds},
        "columns": [[c.key, c.header, c.percent, c.mean] for c in result.columns],
        "flags": result.flags,
        "fingerprints": {**corpus.fingerprints, "embedding": embedding["sha256"]},
        "embedding": embedding,
        "notes": result.notes,
    }
    if result.val.documents is not None:  # every rank names the file; rank 0 writes it
        record["val_documents"] = documents.path(unit.id)
        if runner.rank == 0:
            documents.write(run, unit.id, result.val.documents)
    bound = getattr(corpus.source, "best_token_ppl", None)
    if callable(bound):
        record["best_possible_ppl"] = float(bound(corpus.val.ids.numel(), corpus.val))
    record.update(identity or {})
    if runner.rank == 0:
        files = KeptFiles(config, unit.index, recipe_name, corpus.tokenizer, record)
        keep(run, unit.id, schema.experiment.keep_models, model, result, files, progress.message)
    return record


class _Logged:
    """Progress that also appends every advance to the metrics lines (rank 0 only: one line per event),
    hands the same row to the unit's trackers, and tells the unit's claim which phase runs, for `status`."""

    def __init__(self, inner: Any, run: RunDir, unit: Unit, attempt: int, write: bool, file: Path,
                 claim: UnitClaim | None, tracker: UnitTracking | None = None) -> None:
        self.inner, self.run, self.unit, self.attempt, self.write = inner, run, unit, attempt, write
        self.file, self.claim, self.tracker = file, claim, tracker

    def start(self, phase: str, total: int | None) -> None:
        if self.claim is not None:
            self.claim.beat(phase)
        self.inner.start(phase, total)

    def advance(self, phase: str, **fields: float) -> None:
        if self.write:
            row = {"unit": self.unit.id, "phase": phase, "attempt": self.attempt, **fields}
            self.run.log_metrics(row, self.file)
            if self.tracker is not None:
                self.tracker.log_metrics(row)
        self.inner.advance(phase, **fields)

    def finish(self, phase: str) -> None:
        self.inner.finish(phase)

    def message(self, text: str) -> None:
        self.inner.message(text)


def meta(config: ExperimentConfig, runner: Any, plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "newllm_kit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "experiment": config.schema.experiment.name,
        "config_file": str(config.path),
        "config_sha256": hashlib.sha256(config.resolved_toml().encode()).hexdigest(),
        "runner": runner.describe(),
        "plugins": plugins,
        "embedding": embedding_provenance(config.embedding),
    }


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-model (and per-variant) scaling fits (≥ 2 sizes) over every seed's point, using the same
    fitter as `newllm-kit scaling`. A unit without a PPL (null in results.jsonl: it evaluated nothing)
    is no point."""
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]),
                    json.dumps(r.get("fingerprints"), sort_keys=True), "results.jsonl", r.get("seed"))
              for r in records if _finite(r.get("val_ppl"))]
    by_model: dict[str, set[float]] = {}
    for p in points:
        by_model.setdefault(p.model, set()).add(p.tokens)
    fittable = [p for p in points if len(by_model[p.model]) >= 2]
    if not fittable:
        return {"fits": [], "warnings": ["fewer than 2 training sizes per model: no scaling fit"]}
    return report_to_json(fit_all(fittable, [], "power"))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


Done = dict[tuple[str, str, int, int], dict[str, Any]]  # finished records by Unit.key


def csv_columns(config: ExperimentConfig, units: list[Unit], records: list[dict[str, Any]]) -> list[str]:
    """results.csv: the unit's identity, its token counts, every configured metric, then the columns the
    records' recipes declare (in order of first appearance)."""
    metrics = [metric_key(choice.component.name) for choice in config.metrics]
    declared = [column[0] for r in records for column in r.get("columns", [])]
    return list(dict.fromkeys([*(["variant"] if any(u.variant for u in units) else []), "model", "samples",
                               *(["seed"] if any(u.tag_seed for u in units) else []), "train_tokens", "val_tokens",
                               "val_ppl", "val_acc", *metrics, *declared]))


def finished_units(run: RunDir, config: ExperimentConfig, units: list[Unit], warn: Callable[[str], None]) -> Done:
    """The finished units' records, read from units/<id>/record.json. A record file the kit cannot read,
    or one that belongs to another unit, is moved to results.orphans.jsonl with a warning, and its unit
    runs again: nothing is deleted silently."""
    by_id = {u.id: u for u in units}
    seed = config.schema.experiment.seed_list()[0]
    done: Done = {}
    for unit_id, (file, record, problem) in read_unit_records(run.path).items():
        unit = by_id.get(unit_id)
        why = (f"unreadable record ({problem})" if record is None else
               "a record of a unit not in this run's plan" if unit is None else
               "a record of another unit" if record_key(record, seed) != unit.key else None)
        if why is None and unit is not None and record is not None:
            done[unit.key] = record
            continue
        warn(f"warning: {file}: {why}; moved to {ORPHANS}, and its unit runs again")
        try:
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
        except OSError:
            text = ""
        run.set_aside([text] if text else [])
        run.inside(file).unlink(missing_ok=True)
    return done


def publish(run: RunDir, config: ExperimentConfig, units: list[Unit], warn: Callable[[str], None]) -> Done:
    """Rebuild results.jsonl, results.csv and summary.json from the unit records, under a short claim so
    two processes finishing units at once cannot interleave; returns the finished records."""
    with short_claim(claims_dir(run) / TABLES_CLAIM):
        done = finished_units(run, config, units, warn)
        records = [done[u.key] for u in units if u.key in done]
        if records or (run.path / "results.jsonl").exists():
            run.write_results(records, csv_columns(config, units, records))
            run.write_json("summary.json", {"results": records, "metrics": metric_info(config),
                                            "scaling": summarise(records)})
    return done


def busy_units(run: RunDir, units: list[Unit], stale_after_s: float) -> set[str]:
    """Units whose claim a live process holds: their scratch files and checkpoints are in use."""
    busy = set()
    for unit in units:
        claim = inspect(run.path / UNITS_DIR / unit.id / CLAIM, stale_after_s)
        if claim is not None and claim[1] is None:
            busy.add(unit.id)
    return busy


def update_meta(run: RunDir, **fields: Any) -> dict[str, Any]:
    """Rewrite meta.json with `fields` under its short claim (jobs of one run share the file)."""
    with short_claim(claims_dir(run) / META_CLAIM):
        recorded = run.read_json("meta.json")
        merged = {**(recorded if isinstance(recorded, dict) else {}), **fields}
        run.write_json("meta.json", merged)
    return merged


def adopt_results_jsonl(run: RunDir, config: ExperimentConfig, units: list[Unit], warn: Callable[[str], None]
                        ) -> bool:
    """A run directory written before each unit's record had a file of its own: its results.jsonl
    records become unit records (what no unit of the plan can use is set aside, as a resume always
    did). Whether there was anything to take over."""
    if read_unit_records(run.path):
        return False
    seed = config.schema.experiment.seed_list()[0]
    ids = {u.key: u.id for u in units}
    legacy, set_aside = run.finished_records(lambda r: record_key(r, seed), set(ids), warn)
    for record in legacy:
        write_record(run, ids[record_key(record, seed)], record)
    return bool(legacy) or set_aside


def start_run(config: ExperimentConfig, run: RunDir, units: list[Unit], progress: Any, meta_now: dict[str, Any]
              ) -> tuple[int, Done]:
    """Before any unit (by the process holding the run directory's lock): take over the records of an
    older results.jsonl, repair what a killed process left, write each sweep variant's resolved config,
    and mark the run running. Returns this start's attempt number (1, then +1 per resume) and the
    finished records."""
    adopted = adopt_results_jsonl(run, config, units, progress.message)
    done = finished_units(run, config, units, progress.message)
    if adopted or done:
        done = publish(run, config, units, progress.message)
    stale = stale_after(config)
    run.repair({u.id for u in units if u.key in done}, busy_units(run, units, stale))
    if config.variants:
        run.inside(run.path / VARIANTS_DIR).mkdir(exist_ok=True)
        for variant in config.variants:
            run.write_text(f"{VARIANTS_DIR}/{variant.name}.toml", variant.config.resolved_toml())
    with short_claim(claims_dir(run) / META_CLAIM):
        previous, attempt, pinned = run.read_json("meta.json"), 1, {}
        if isinstance(previous, dict):
            attempt = previous["attempt"] + 1 if isinstance(previous.get("attempt"), int) else 2
            pinned = {k: previous[k] for k in PINNED if isinstance(previous.get(k), dict)}
        run.write_json("meta.json", {**meta_now, **pinned, "status": "running", "attempt": attempt})
    return attempt, done


def stale_after(config: ExperimentConfig) -> float:
    """`launcher.stale_after_s`: how old a claim's heartbeat may be before its unit is taken over."""
    value = getattr(config.schema.launcher, "stale_after_s", STALE_AFTER_S)
    return float(value)


def find_unit(units: list[Unit], unit_id: str, run: RunDir) -> Unit:
    match = next((u for u in units if u.id == unit_id), None)
    if match is None:
        shown = ", ".join(u.id for u in units[:6]) + (" …" if len(units) > 6 else "")
        raise UserError(f"--unit {unit_id}: not a unit of {run.path} (its units: {shown}); see "
                        f"`newllm-kit status {run.path}`")
    return match


def _claim(run: RunDir, unit: Unit, stale: float, progress: Any) -> UnitClaim | dict[str, Any]:
    """Claim the unit for this process, or say who holds it."""
    folder = unit_dir(run, unit.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return UnitClaim.take(folder / CLAIM, stale, progress.message)
    except Claimed as held:
        return held.holder


class UnitBusy(UserError):
    """A job found its unit claimed by a live process: nothing failed, the unit runs there."""


def failure_line(error: BaseException) -> tuple[str, int]:
    """What units/<id>/failed.json says: the one-line error a user sees, and the exit code."""
    if isinstance(error, UserError | RunFailed):
        return " ".join(str(error).split()), error.exit_code
    text = str(error).strip().splitlines()
    return f"internal error: {type(error).__name__}{': ' + text[0] if text else ''}", 1


def run_experiment(config: ExperimentConfig, run: RunDir, runner: Runner, progress: Any,
                   plugin_report: list[dict[str, Any]], only: str | None = None) -> list[dict[str, Any]]:
    """Run every unit not yet finished, in plan order; returns all finished records. With `only`, run
    just that unit (a launcher's job: no lock on the run directory, its own claim, its own metrics
    file) and return its record. Rank 0 decides and claims; the other ranks follow it."""
    units = plan(config)
    chosen = units if only is None else [find_unit(units, only, run)]
    stale = stale_after(config)
    attempt: int = 0
    finished: Done = {}
    if runner.rank == 0:
        if only is None:
            attempt, finished = start_run(config, run, units, progress, meta(config, runner, plugin_report))
        else:
            finished = finished_units(run, config, units, progress.message)
            recorded = run.read_json("meta.json")
            attempt = recorded.get("attempt", 1) if isinstance(recorded, dict) else 1
    shared = share(runner, [attempt, [[u.id, finished[u.key]] for u in units if u.key in finished]])
    attempt, by_id = shared[0], dict(shared[1])
    done: Done = {u.key: by_id[u.id] for u in units if u.id in by_id}
    progress.experiment(config.schema.experiment.name, len(chosen))
    corpora: dict[str, CorpusCache] = {}
    pinned: dict[str, dict[str, str]] = {}  # variant -> the fingerprint set checked against meta.json
    elsewhere: list[str] = []  # units another live process holds
    tracking = Tracking(config, run, runner.rank, progress.message)
    for i, unit in enumerate(chosen, start=1):
        progress.begin_unit(unit.id, i, len(chosen))
        if unit.key in done:
            progress.end_unit(unit.id, "(already finished)")
            continue
        claim = _claim(run, unit, stale, progress) if runner.rank == 0 else None
        holder = share(runner, claim if isinstance(claim, dict) else None)
        if holder is not None:
            if only is not None:
                raise UnitBusy(f"{unit.id}: claimed by {describe(holder)}, which is running it; see "
                               f"`newllm-kit status {run.path}`")
            progress.end_unit(unit.id, f"(running elsewhere: {describe(holder)})")
            elsewhere.append(f"{unit.id} ({describe(holder)})")
            continue
        mine = claim if isinstance(claim, UnitClaim) else None
        with tracking.unit(unit_config(config, unit), unit.id, attempt) as tracker:  # its exit: end(status)
            try:
                record = _run_claimed(config, unit, run, runner, progress, attempt, mine, only is not None,
                                      corpora, pinned, tracker)
            except KeyboardInterrupt:
                if mine is not None:
                    mine.release()
                raise
            except BaseException as error:
                if mine is not None:
                    write_failure(run, unit.id, *failure_line(error))
                    mine.release()
                if isinstance(error, RunFailed) and not str(error).startswith(f"{unit.id}:"):
                    raise RunFailed(f"{unit.id}: {error}") from error  # name the unit, once
                raise
            done[unit.key] = record
            if mine is not None:
                mine.beat()  # reads the claim back: another process may have taken the unit over meanwhile
                if mine.lost is not None:
                    mine.release()
                    raise RunFailed(f"{unit.id}: its claim was taken over by {describe(mine.lost)} while it ran "
                                    f"(its heartbeat stalled); that process's record counts, this one is dropped")
                write_record(run, unit.id, record)
                run.drop_checkpoint(unit.id)
                mine.release()
                done = publish(run, config, units, progress.message)
            tracker.finish(record)
        runner.barrier()
        progress.end_unit(unit.id, f"val_ppl={record['val_ppl']:.2f} val_acc={record['val_acc']:.4f}")
    if runner.rank == 0:
        done = publish(run, config, units, progress.message)
        if elsewhere:
            raise RunFailed(f"{len(elsewhere)} unit(s) are running in another process: {', '.join(elsewhere)}; "
                            f"nothing of theirs was run here twice; watch them with `newllm-kit status {run.path}`")
        if all(u.key in done for u in units):
            finish_meta(config, run, units, done, meta(config, runner, plugin_report), attempt,
                        repair=only is None)
    if only is not None:
        return [done[chosen[0].key]]
    return [done[u.key] for u in units]


def _run_claimed(config: ExperimentConfig, unit: Unit, run: RunDir, runner: Runner, progress: Any, attempt: int,
                 claim: UnitClaim | None, as_job: bool, corpora: dict[str, CorpusCache],
                 pinned: dict[str, dict[str, str]], tracker: UnitTracking | None = None) -> dict[str, Any]:
    """One claimed unit: its corpus, its pinned fingerprints, its recipe, and its record."""
    unit_cfg = unit_config(config, unit)
    if as_job and runner.rank == 0:
        run.repair_unit(unit.id)
    corpus = _corpus(unit_cfg, run, runner, corpora)
    if runner.rank == 0 and unit.variant not in pinned:
        with short_claim(claims_dir(run) / META_CLAIM):
            pinned[unit.variant] = pin_fingerprints(run, unit.variant, unit_fingerprints(unit_cfg, corpus))
    identity: dict[str, Any] = {"seed": unit.seed}
    if unit.variant:
        identity |= {"variant": unit.variant,
                     "sweep": next(dict(v.changes) for v in config.variants if v.name == unit.variant)}
    try:
        record = run_unit(unit_cfg, unit, corpus, runner, run, progress, attempt, claim, as_job, identity,
                          tracker=tracker)
    except RunFailed:
        if runner.rank == 0:
            update_meta(run, failed_unit=unit.id)  # the unit whose numbers were refused: it runs again
        raise
    finally:
        with suppress(OSError):  # the unit's scratch folder, and store/ once no unit uses it
            (run.path / STORE_DIR / unit.id).rmdir()
            (run.path / STORE_DIR).rmdir()
    return {**record, **identity}


def finish_meta(config: ExperimentConfig, run: RunDir, units: list[Unit], done: Done, meta_now: dict[str, Any],
                attempt: int, repair: bool) -> None:
    """Every unit finished: meta.json says so (keeping the pinned fingerprints) and names each unit's
    context store; the process that ran the whole run also removes what no resume needs any more."""
    if repair:
        run.repair({u.id for u in units})  # nothing left to resume: no checkpoints/ either
    stores = {u.id: done[u.key].get("context_store") for u in units}
    with short_claim(claims_dir(run) / META_CLAIM):
        recorded = run.read_json("meta.json")
        kept = {k: recorded[k] for k in (*PINNED, DISABLED)  # this start's disabled trackers too
                if isinstance(recorded, dict) and isinstance(recorded.get(k), dict)}
        if "fingerprints" not in kept:  # a run finished before sets were pinned: its records say
            kept["fingerprints"] = next(iter(done.values())).get("fingerprints")
        run.write_json("meta.json", {**meta_now, **kept, "status": "finished",
                                     "attempt": recorded.get("attempt", attempt) if isinstance(recorded, dict)
                                     else attempt, "context_stores": stores})


def _corpus(config: ExperimentConfig, run: RunDir, runner: Collectives, corpora: dict[str, CorpusCache]
            ) -> CorpusCache:
    """The tokenised corpus of a unit's config, built once per distinct data and tokenizer settings
    (a sweep may change them). Rank 0 tokenises first and the others then read its cache: every rank
    gets the same tokenizer and streams, and no two processes train a tokenizer into the same file at once."""
    key = _corpus_key(config)
    if key not in corpora:
        cache_dir = run.path.parent / ".cache"
        corpus = CorpusCache(config, cache_dir) if runner.rank == 0 else None
        runner.barrier()
        corpora[key] = corpus or CorpusCache(config, cache_dir)
    return corpora[key]


def _corpus_key(config: ExperimentConfig) -> str:
    resolved = config.resolved()
    return json.dumps([resolved["data"], resolved["tokenizer"], resolved["experiment"]["samples"]], sort_keys=True)


def prepare_corpora(config: ExperimentConfig, run: RunDir, units: list[Unit]) -> None:
    """Tokenise each distinct corpus of `units` once, before their jobs start: concurrent jobs then only
    read the cache, and none tokenises into a file another is writing."""
    seen: set[str] = set()
    for unit in units:
        unit_cfg = unit_config(config, unit)
        key = _corpus_key(unit_cfg)
        if key not in seen:
            seen.add(key)
            CorpusCache(unit_cfg, run.path.parent / ".cache")


def unit_fingerprints(config: ExperimentConfig, corpus: CorpusCache) -> dict[str, str]:
    """What a unit of this run trains and scores on: corpus, tokenizer, scheme, split, embedding
    table, and the sha256 of the training and validation token ids."""
    dev = {} if corpus.dev is None else {"dev_ids": corpus.dev.sha256}
    return {**corpus.fingerprints, "embedding": embedding_provenance(config.embedding)["sha256"],
            "train_ids": corpus.train.sha256, "val_ids": corpus.val.sha256, **dev}
