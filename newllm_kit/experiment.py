"""Running an experiment: every model × training size, Phase 1 then Phase 2, resumable.

One unit = one model at one training size. The corpus is read and tokenised once for the
largest size (smaller sizes are prefixes of the same stream, so every size shares one
tokenizer and one validation set, which keeps their PPLs comparable); then each unit is
seeded, built, trained, evaluated and recorded. Checkpoints after Phase 1 and after every
Phase-2 epoch let `--resume` continue a killed unit; finished units are never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, phase1_contexts
from .config import ExperimentConfig, read_toml
from .context_store import StorePlan, context_stores, is_out_of_memory, out_of_memory_message, plan_stores
from .corpus import Stream, embedding_provenance, load_streams
from .diagnostics import diagnostic_warnings, seed_diagnostics
from .errors import DataError, RunFailed, UserError
from .params import check_model_fits
from .phase2 import (
    Phase2Data,
    Phase2Report,
    Phase2State,
    context_agreement,
    input_weights,
    train_phase2,
    weights_as,
)
from .protocols import EvalOutputs, Phase1Report, Runner, SolveResult
from .rundir import RESULT_CSV_COLUMNS, STORE_DIR, Checkpoint, CheckpointUnreadable, RunDir
from .scaling import Point, fit_all, report_to_json, series
from .split_phase1 import phase1_solver

VARIANTS_DIR = "variants"  # each sweep variant's resolved config, <name>.toml


@dataclass(frozen=True)
class Unit:
    label: str
    samples: int
    index: int  # position of the model in [[models]]
    seed: int = 42
    variant: str = ""  # the sweep variant's name; "" without [sweep]
    tag_seed: bool = False  # several seeds: the id names the seed

    @property
    def id(self) -> str:
        """`A-300`, `A-300-s43` with several seeds, `lr-0.1-A-300` in a sweep. A single-seed run keeps
        the plain id, so run directories written before seeds existed still resume."""
        base = f"{self.variant}-{self.label}-{self.samples}" if self.variant else f"{self.label}-{self.samples}"
        return f"{base}-s{self.seed}" if self.tag_seed else base

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.variant, self.label, self.samples, self.seed


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
        self.train, self.val, self.tokenizer, self.fingerprints = load_streams(
            source, schema.data.text, config.tokenizer.build(), train_rows, val_rows, cache_dir
        )
        self.source = source
        if len(self.val.ids) < 2:
            raise DataError(f"{config.path}: data.val: the validation rows hold {len(self.val.ids)} token(s); "
                            f"need at least 2")

    def train_ids(self, samples: int) -> torch.Tensor:
        ids = _prefix(self.train, samples)
        if len(ids) < 2:
            raise DataError(f"training on {samples} sample(s) gives {len(ids)} token(s); need at least 2")
        return ids


def build_model(config: ExperimentConfig, unit: Unit, vocab_size: int, runner: Runner) -> Any:
    """Seeded construction: the same seed gives the same weights on every machine."""
    check_model_fits(config, unit.index, vocab_size, runner.device)
    seed_everything(config.schema.experiment.seed)
    architecture = config.models[unit.index][1].build()
    model = architecture.build(vocab_size)
    generator = torch.Generator().manual_seed(config.schema.experiment.seed)
    weight = config.embedding.build().load(vocab_size, architecture.embedding_dim, generator)
    model.set_embedding(weight, freeze=config.schema.embedding.freeze)
    return model.to(runner.device)


def _checkpoint_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's state without the frozen embedding table (its source fingerprint rebuilds it)."""
    table, _ = model.output_head()
    frozen = [p for p in model.parameters() if not p.requires_grad and p.shape == table.shape]
    skip = {p.data_ptr() for p in frozen}
    return {k: v for k, v in model.state_dict().items() if v.data_ptr() not in skip}


PHASE1_KEYS = {"iterations", "convergence_rate", "token_evaluations", "seconds", "train_er"}


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def _decode(model: Any, saved: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any], Phase2State | None]:
    """Weights, Phase-1 summary and Phase-2 state of a checkpoint, checked against the model before
    anything is loaded into it (KeyError, TypeError or ValueError when they do not fit)."""
    _, groups, state = saved
    weights, phase1 = groups["model"], state["phase1"]
    if _shapes(weights) != _shapes(_checkpoint_tensors(model)):
        raise ValueError("its weights do not fit the model")
    if not PHASE1_KEYS <= set(phase1):
        raise ValueError("its phase-1 summary is incomplete")
    phase2 = Phase2State.from_checkpoint(groups["phase2"], state["phase2"]) if "phase2" in state else None
    if phase2 is not None:
        trained = _shapes(dict(model.named_parameters())).items()
        if not (_shapes(phase2.model).items() <= trained and _shapes(phase2.best_weights).items() <= trained):
            raise ValueError("its phase-2 weights do not fit the model")
    return weights, phase1, phase2


def _read_checkpoint(run: RunDir, unit: Unit, model: Any, runner: Runner, progress: Any) -> Checkpoint | None:
    """The unit's checkpoint if it is whole and fits the model; a damaged one is reported and
    removed, and the unit starts over."""
    try:
        saved = run.load_checkpoint(unit.id, runner.device)
        if saved is not None:
            _decode(model, saved)
        return saved
    except (CheckpointUnreadable, KeyError, TypeError, ValueError) as error:
        progress.message(f"warning: {unit.id}: the checkpoint in {run.checkpoint_dir(unit.id)} is unreadable "
                         f"({error}); starting the unit over")
        run.drop_checkpoint(unit.id)
        return None


def share(runner: Runner, value: Any) -> Any:
    """Rank 0's `value` (anything JSON holds) on every rank: one rank decides, so ranks cannot diverge."""
    if runner.world_size == 1:
        return value
    data = json.dumps(value).encode() if runner.rank == 0 else b""
    size = runner.broadcast(torch.tensor([len(data)], device=runner.device), 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=runner.device)
    if runner.rank == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return json.loads(runner.broadcast(buffer, 0).cpu().numpy().tobytes())


def _share_checkpoint(runner: Runner, saved: Checkpoint | None) -> Checkpoint | None:
    """Rank 0's checkpoint on every rank (stage and state as JSON, then each tensor), so ranks on
    machines without a shared --out continue from the same point."""
    header = share(runner, None if saved is None else {
        "stage": saved[0], "state": saved[2],
        "tensors": {group: {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in values.items()}
                    for group, values in saved[1].items()}})
    if header is None:
        return None
    groups = saved[1] if saved is not None else {
        group: {name: torch.empty(shape, dtype=getattr(torch, dtype), device=runner.device)
                for name, (dtype, shape) in values.items()} for group, values in header["tensors"].items()}
    for group in sorted(groups):
        for name in sorted(groups[group]):
            runner.broadcast(groups[group][name], 0)
    return header["stage"], groups, header["state"]


def _resume_point(run: RunDir, unit: Unit, model: Any, runner: Runner, progress: Any
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Phase2State | None] | None:
    """Where a unit continues (None: from scratch). Rank 0 reads the checkpoint and every rank gets its copy."""
    saved = _read_checkpoint(run, unit, model, runner, progress) if runner.rank == 0 else None
    if runner.world_size > 1:
        saved = _share_checkpoint(runner, saved)
    return None if saved is None else _decode(model, saved)


def _stopped_by(report: Phase1Report) -> str | None:
    """"converged" or "max_iterations" (None when the solver does not say)."""
    return None if report.converged is None else "converged" if report.converged else "max_iterations"


NON_CONTRACTING = "the ContextBlock does not contract"


def _solve_notes(messages: list[str], solves: dict[str, SolveResult]) -> list[str]:
    """The frozen solves' warnings, one line per kind: the non-contracting fallback is expected for
    trained CVFP blocks and changes nothing in the numbers, so it is said once, with what it means."""
    gains = {name: s.gain for name, s in solves.items() if s.gain is not None and not s.gain < 1}
    notes = []
    if gains:
        measured = ", ".join(f"{gain:.3g} on {name}" for name, gain in gains.items())
        notes.append(f"the frozen ContextBlock does not contract (gain {measured} >= 1), so no parallel solve "
                     f"converges; its contexts come from the sequential rollout, the reference method: exact, "
                     f"only slower")
    notes += [m for m in dict.fromkeys(messages) if not m.startswith(NON_CONTRACTING)]
    return notes


def _metric_values(config: ExperimentConfig, outputs: EvalOutputs) -> dict[str, float]:
    return {choice.component.name: float(choice.build().compute(outputs)) for choice in config.metrics}


def _phase1(config: ExperimentConfig, unit: Unit, model: Any, solver: Any, ids: torch.Tensor, runner: Runner,
            progress: Any, keep: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Phase 1, its summary and the first `keep` rows of its final contexts (all of them for the
    fast Phase-2 path, a few for the context comparison). The rest of the [n, C] training contexts
    is needed only for the Train ER, so it is dropped here, before any Phase-2 store exists."""
    started = time.perf_counter()
    report = solver.fit(model, ids, runner, progress)
    seconds = time.perf_counter() - started
    train_outputs = EvalOutputs(contexts=report.contexts, context_width=model.context_dim,
                                convergence_rate=report.convergence_rate, seed=config.schema.experiment.seed)
    phase1 = {"iterations": report.iterations, "convergence_rate": report.convergence_rate,
              "token_evaluations": report.token_evaluations, "seconds": seconds,
              "train_er": _effective_rank_fraction(config, train_outputs),
              "stopped_by": _stopped_by(report), "target_rate": report.target_rate}
    if report.converged is False:
        progress.message(f"{unit.id}: Phase 1 stopped at max_iterations ({report.iterations}) with "
                         f"{report.convergence_rate:.0%} of tokens converged (target "
                         f"{report.target_rate:.0%}); its contexts are not at a fixed point")
    kept = report.contexts[:keep]
    del report, train_outputs
    return phase1, kept


@contextmanager
def out_of_memory(unit: Unit, phase: str, plan: StorePlan, fix: str) -> Iterator[None]:
    """Out of memory in `phase` ends the run in one line: the phase, what the context stores take,
    and the settings that lower it."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise RunFailed(out_of_memory_message(unit.id, phase, error, plan, fix)) from error


def run_unit(config: ExperimentConfig, unit: Unit, corpus: CorpusCache, runner: Runner, run: RunDir,
             progress: Any, attempt: int) -> dict[str, Any]:
    schema = config.schema
    vocab_size = corpus.tokenizer.vocab_size
    model = build_model(config, unit, vocab_size, runner)
    solver = phase1_solver(config.solver.build(), model, corpus.train.boundaries[:unit.samples])
    train_ids = corpus.train_ids(unit.samples).to(runner.device)
    val_ids = corpus.val.ids.to(runner.device)
    logged = _Logged(progress, run, unit, attempt, runner.rank == 0)
    inputs = input_weights(model, train_ids)  # before a Phase-2 checkpoint may load trained ones

    # Phase 1's final contexts outlive Phase 1 where Phase 2 reads them (train_contexts = "phase1") or
    # the comparison with the rollout does: saved beside the checkpoints, read back on every start.
    p2 = schema.phase2
    fast = p2.train_contexts == "phase1"
    compared = min(p2.compare_tokens, train_ids.numel() - 1) if p2.compare_contexts else 0
    keep = train_ids.numel() if fast else compared
    kept_file = run.checkpoint_dir(unit.id) / phase1_contexts.FILE
    resumed = _resume_point(run, unit, model, runner, progress)
    if resumed is not None and keep and not phase1_contexts.readable(kept_file, keep, model.context_dim, runner):
        progress.message(f"warning: {unit.id}: {kept_file} is missing or damaged; starting the unit over")
        if runner.rank == 0:
            run.drop_checkpoint(unit.id)
        resumed = None
    phase2_start: Phase2State | None = None
    if resumed is None:
        phase1, kept = _phase1(config, unit, model, solver, train_ids, runner, logged, keep)
        if runner.rank == 0:
            if keep:
                run.write_stream(kept_file, lambda handle: phase1_contexts.write(handle, kept))
            run.save_checkpoint(unit.id, "phase1", {"model": _checkpoint_tensors(model)}, {"phase1": phase1})
        del kept
        runner.barrier()
    else:
        weights, phase1, phase2_start = resumed
        model.load_state_dict(weights, strict=False)
        progress.message(f"{unit.id}: resumed from checkpoint ({'phase 2' if phase2_start else 'phase 1 done'})")

    for parameter in model.param_groups()["phase1"]:
        parameter.requires_grad_(False)
    folder = run.inside(run.path / STORE_DIR)
    sizes = {"train": train_ids.numel(), "val": val_ids.numel()}
    plan = plan_stores(runner, sum(sizes.values()), model.context_dim, folder)
    progress.message(f"{unit.id}: {plan.describe()}")
    seed_everything(schema.experiment.seed + 1)  # solves after Phase 1 see the same RNG on resume
    with context_stores(plan, sizes, model.context_dim, runner, unit.id, folder) as stores:
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, weights_as(model, inputs):  # OOM: the solver says
            warnings.simplefilter("always")
            if fast:
                phase1_contexts.read_into(kept_file, stores["train"], runner)
                train_solve = SolveResult([stores["train"]], "phase1", 0, 0, time.perf_counter() - started)
            else:
                train_solve = solver.solve(model, train_ids, runner, out=stores["train"])
            val_solve = solver.solve(model, val_ids, runner, out=stores["val"])
            agreement = (_context_agreement(model, solver, train_ids, stores["train"], kept_file, compared, fast,
                                            inputs, runner) if compared else None)
        solve_seconds = time.perf_counter() - started
        notes = _solve_notes([str(w.message) for w in caught], {"train": train_solve, "val": val_solve})
        if fast:
            notes.insert(0, "Phase-2 training contexts are F(P_{i-1}, x_i) of Phase 1's final contexts "
                            "(phase2.train_contexts = \"phase1\"): no rollout over the training stream")
        if agreement is not None:
            notes.append(f"phase1 vs rollout contexts on the first {compared:,} training tokens: mean cosine "
                         f"{agreement['mean_cosine']:.4f}, min {agreement['min_cosine']:.4f}, "
                         f"MSE {agreement['mse']:.3g}")
        for note in notes:
            progress.message(f"{unit.id}: {note}")
        with weights_as(model, inputs):
            diagnostics = seed_diagnostics(model, val_ids, {"train": train_solve, "val": val_solve},
                                           schema.solver.val_convergence_trials, schema.experiment.seed)
        skip_phase2 = schema.solver.skip_phase2_if_identity and diagnostics["identity"]["identity"]
        for note in diagnostic_warnings(diagnostics) + (["Phase 2 skipped (solver.skip_phase2_if_identity)"]
                                                       if skip_phase2 else []):
            progress.message(f"{unit.id}: {note}")
            notes.append(note)

        def checkpoint(state: Phase2State) -> None:
            if runner.rank == 0:
                tensors, data = state.to_checkpoint()
                run.save_checkpoint(unit.id, "phase2", {"model": _checkpoint_tensors(model), "phase2": tensors},
                                    {"phase1": phase1, "phase2": data})
            runner.barrier()

        started = time.perf_counter()
        with out_of_memory(unit, "phase 2", plan, plan.fix("phase2.batch_size lower")):
            report2 = Phase2Report(0, 0, [], EvalOutputs(), 0.0) if skip_phase2 else train_phase2(
                model, Phase2Data(train_solve.layers[-1], train_ids, inputs),
                Phase2Data(val_solve.layers[-1], val_ids, inputs), schema.phase2, runner,
                logged, start=phase2_start, on_epoch_end=checkpoint)
        phase2_seconds = time.perf_counter() - started

        val_outputs = report2.val  # the val ER reads the same store Phase 2 evaluated
        val_outputs.contexts = val_solve.layers[-1]
        val_outputs.context_width = model.context_dim
        val_outputs.convergence_rate = phase1["convergence_rate"]
        val_outputs.seed = schema.experiment.seed
        metrics = _metric_values(config, val_outputs)
    counts = model.param_counts()
    groups = model.param_groups()
    embedding = embedding_provenance(config.embedding)
    record: dict[str, Any] = {
        "model": unit.label,
        "samples": unit.samples,
        "train_tokens": int(train_ids.numel()),
        "val_tokens": int(val_ids.numel()),
        "val_ppl": metrics.get("ppl", float(np.exp(val_outputs.nll_sum / max(val_outputs.count, 1)))),
        "val_acc": metrics.get("accuracy", val_outputs.correct / max(val_outputs.count, 1)),
        "train_er": phase1["train_er"],
        "val_er": metrics.get("effective_rank", float("nan")),
        "phase1_iterations": phase1["iterations"],
        "convergence_rate": phase1["convergence_rate"],
        "phase1_stopped_by": phase1.get("stopped_by"),
        "phase1_target_rate": phase1.get("target_rate"),
        "phase1_token_evaluations": phase1["token_evaluations"],
        "best_epoch": report2.best_epoch,
        "phase2_batch_size": report2.batch_size,
        "epochs_run": report2.epochs_run,
        "metrics": metrics,
        "params": {**counts, "trainable": {k: sum(p.numel() for p in v) for k, v in groups.items()}},
        "solve": {"method": train_solve.method, "gain": train_solve.gain, "iterations": train_solve.iterations},
        "seconds": {"phase1": phase1["seconds"], "solve": solve_seconds, "phase2": phase2_seconds},
        "context_store": plan.to_json(),
        "fingerprints": {**corpus.fingerprints, "embedding": embedding["sha256"]},
        "embedding": embedding,
        "diagnostics": diagnostics,
        "phase2_skipped": skip_phase2,
        "phase1_splits": getattr(solver, "splits", None) or None,  # None: one split, or resumed after Phase 1
        "train_contexts": p2.train_contexts,
        "context_agreement": agreement,
        "notes": notes,
    }
    bound = getattr(corpus.source, "best_token_ppl", None)
    if callable(bound):
        record["best_possible_ppl"] = float(bound(corpus.val.ids.numel(), corpus.val))
    return record


def _context_agreement(model: Any, solver: Any, ids: torch.Tensor, store: torch.Tensor, kept_file: Path, rows: int,
                       fast: bool, inputs: dict[str, torch.Tensor], runner: Runner) -> dict[str, float]:
    """Phase 1's final contexts against the sequential rollout on the first `rows` training positions
    (spec §7 item 7's check, per unit). The fast path's store is P, so the rollout is solved for those
    rows; the rollout path's store is the rollout, and P's first rows were kept in `kept_file`."""
    if fast:
        previous = store[:rows]
        rollout = solver.solve(model, ids[:rows], runner).layers[-1]
    else:
        previous = torch.empty(rows, store.shape[1])
        phase1_contexts.read_into(kept_file, previous, runner)
        rollout = store[:rows]
    return context_agreement(model, Phase2Data(previous, ids, inputs), rollout, runner.device)


def _effective_rank_fraction(config: ExperimentConfig, outputs: EvalOutputs) -> float:
    """Train ER uses the configured effective_rank metric (NaN when the file does not ask for it)."""
    for choice in config.metrics:
        if choice.component.name == "effective_rank":
            return float(choice.build().compute(outputs))
    return float("nan")


class _Logged:
    """Progress that also appends every advance to metrics.jsonl (rank 0 only: one line per event)."""

    def __init__(self, inner: Any, run: RunDir, unit: Unit, attempt: int, write: bool) -> None:
        self.inner, self.run, self.unit, self.attempt, self.write = inner, run, unit, attempt, write

    def start(self, phase: str, total: int | None) -> None:
        self.inner.start(phase, total)

    def advance(self, phase: str, **fields: float) -> None:
        if self.write:
            self.run.log_metrics({"unit": self.unit.id, "phase": phase, "attempt": self.attempt, **fields})
        self.inner.advance(phase, **fields)

    def finish(self, phase: str) -> None:
        self.inner.finish(phase)

    def message(self, text: str) -> None:
        self.inner.message(text)


def meta(config: ExperimentConfig, runner: Runner, plugins: list[dict[str, Any]]) -> dict[str, Any]:
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
    fitter as `newllm-kit scaling`."""
    points = [Point(series(r), float(r["train_tokens"]), float(r["val_ppl"]),
                    json.dumps(r.get("fingerprints"), sort_keys=True), "results.jsonl", r.get("seed"))
              for r in records]
    by_model: dict[str, set[float]] = {}
    for p in points:
        by_model.setdefault(p.model, set()).add(p.tokens)
    fittable = [p for p in points if len(by_model[p.model]) >= 2]
    if not fittable:
        return {"fits": [], "warnings": ["fewer than 2 training sizes per model: no scaling fit"]}
    return report_to_json(fit_all(fittable, [], "power"))


Done = dict[tuple[str, str, int, int], dict[str, Any]]  # finished records by Unit.key


def _publish(run: RunDir, units: list[Unit], done: Done) -> None:
    """results.jsonl, results.csv and summary.json of the finished units: one step, redone on every start."""
    records = [done[u.key] for u in units if u.key in done]
    columns = [*(["variant"] if any(u.variant for u in units) else []), *RESULT_CSV_COLUMNS[:2],
               *(["seed"] if any(u.tag_seed for u in units) else []), *RESULT_CSV_COLUMNS[2:]]
    run.write_results(records, columns)
    run.write_json("summary.json", {"results": records, "scaling": summarise(records)})


def _finished(records: list[dict[str, Any]], config: ExperimentConfig) -> Done:
    seed = config.schema.experiment.seed_list()[0]
    return {record_key(r, seed): r for r in records}


def _start(config: ExperimentConfig, run: RunDir, units: list[Unit], progress: Any, meta_now: dict[str, Any]
           ) -> tuple[int, list[dict[str, Any]]]:
    """Rank 0, before any unit: repair what a killed process left, write each sweep variant's resolved
    config, and mark the run running. Returns this process's attempt number (1, then +1 per resume)
    and the finished records."""
    records = run.results(progress.message)
    done = _finished(records, config)
    if records:
        _publish(run, units, done)
    run.repair({u.id for u in units if u.key in done})
    if config.variants:
        run.inside(run.path / VARIANTS_DIR).mkdir(exist_ok=True)
        for variant in config.variants:
            run.write_text(f"{VARIANTS_DIR}/{variant.name}.toml", variant.config.resolved_toml())
    previous, attempt = run.read_json("meta.json"), 1
    if isinstance(previous, dict):
        attempt = previous["attempt"] + 1 if isinstance(previous.get("attempt"), int) else 2
    run.write_json("meta.json", {**meta_now, "status": "running", "attempt": attempt})
    return attempt, records


def run_experiment(config: ExperimentConfig, run: RunDir, runner: Runner, progress: Any,
                   plugin_report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every unit not yet in results.jsonl; returns all records, in plan order. Rank 0 decides
    which units are finished and the other ranks follow, so they cannot diverge."""
    units = plan(config)
    attempt, finished = (_start(config, run, units, progress, meta(config, runner, plugin_report))
                         if runner.rank == 0 else (0, []))
    done = _finished(share(runner, finished), config)
    progress.experiment(config.schema.experiment.name, len(units))
    corpora: dict[str, CorpusCache] = {}
    corpus: CorpusCache | None = None
    for i, unit in enumerate(units, start=1):
        progress.begin_unit(unit.id, i, len(units))
        if unit.key in done:
            progress.end_unit(unit.id, "(already finished)")
            continue
        unit_cfg = unit_config(config, unit)
        corpus = _corpus(unit_cfg, run, runner, corpora)
        try:
            record = run_unit(unit_cfg, unit, corpus, runner, run, progress, attempt)
        except RunFailed as error:  # name the unit, once
            if str(error).startswith(f"{unit.id}:"):
                raise
            raise RunFailed(f"{unit.id}: {error}") from error
        record["seed"] = unit.seed
        if unit.variant:
            record["variant"] = unit.variant
            record["sweep"] = next(dict(v.changes) for v in config.variants if v.name == unit.variant)
        done[unit.key] = record
        if runner.rank == 0:
            _publish(run, units, done)
            run.drop_checkpoint(unit.id)
        runner.barrier()
        progress.end_unit(unit.id, f"val_ppl={record['val_ppl']:.2f} val_acc={record['val_acc']:.4f}")
    if runner.rank == 0:
        run.repair({u.id for u in units})  # nothing left to resume: no checkpoints/ either
        stores = {u.id: done[u.key].get("context_store") for u in units}
        prints = corpus.fingerprints if corpus is not None else next(iter(done.values())).get("fingerprints")
        run.write_json("meta.json", {**meta(config, runner, plugin_report), "status": "finished",
                                     "attempt": attempt, "fingerprints": prints, "context_stores": stores})
    return [done[u.key] for u in units]


def _corpus(config: ExperimentConfig, run: RunDir, runner: Runner, corpora: dict[str, CorpusCache]) -> CorpusCache:
    """The tokenised corpus of a unit's config, built once per distinct data and tokenizer settings
    (a sweep may change them). Rank 0 tokenises first and the others then read its cache: every rank
    gets the same tokenizer and streams, and no two processes train a tokenizer into the same file at once."""
    resolved = config.resolved()
    key = json.dumps([resolved["data"], resolved["tokenizer"], resolved["experiment"]["samples"]], sort_keys=True)
    if key not in corpora:
        cache_dir = run.path.parent / ".cache"
        corpus = CorpusCache(config, cache_dir) if runner.rank == 0 else None
        runner.barrier()
        corpora[key] = corpus or CorpusCache(config, cache_dir)
    return corpora[key]


def check_resume_compatible(saved_file: Path, config: ExperimentConfig) -> None:
    """Refuse to mix results of two different configurations in one run directory."""
    saved = _flatten(read_toml(saved_file))
    now = _flatten(config.resolved())
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differing:
        shown = ", ".join(differing[:8]) + (" …" if len(differing) > 8 else "")
        raise UserError(f"cannot resume: the configuration differs from the run's config.resolved.toml in "
                        f"{shown}; start a new run instead")
    # The same settings can name another table (the hub's `main` moves): the run's meta.json says which it used.
    try:
        recorded = json.loads((saved_file.parent / "meta.json").read_text(encoding="utf-8")).get("embedding")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, dict):
        now_embedding = embedding_provenance(config.embedding)
        changed = sorted(k for k in set(recorded) | set(now_embedding) if recorded.get(k) != now_embedding.get(k))
        if changed:
            key = changed[0]
            raise UserError(f"cannot resume: embedding.{key} differs from the run's meta.json ({recorded.get(key)!r} "
                            f"then, {now_embedding.get(key)!r} now), so Phase 2 would read another table; pin "
                            f"embedding.revision to the run's, or start a new run")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}
