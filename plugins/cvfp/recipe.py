"""The recipe `cvfp`: Phase 1 (fixed-point training of the ContextBlock through a solver), freeze,
frozen solves of both streams, the seed's diagnostics, then Phase 2 (the TokenBlock) on those contexts.

`CVFPRecipe.train` runs a unit as six stages, in this order, each a method from one small record to
the next:

1. Phase 1 or resume (`_resume` or `_phase1` → `Phase1Done`): a fitting checkpoint's weights,
   Phase-1 summary and Phase-2 state; or Phase 1 itself, checkpointed with the final contexts kept;
2. freeze (`_freeze`): the ContextBlock stops training;
3. solves and stores (`_solves` → `Solved`): the context stores planned and opened (they stay open
   until Phase 2 ends), both streams' frozen contexts solved into them, and Phase 1's contexts
   compared with the rollout;
4. diagnostics (`_diagnose` → `Diagnosed`): the seed's diagnostics of the frozen block, and whether
   Phase 2 is skipped;
5. Phase 2 (`_phase2` → `Phase2Done`): the TokenBlock trained on the stored contexts,
   checkpointed after every epoch;
6. record (`_record` → `RecipeResult`): the unit's results row, notes and flags.

Every stage reads `UnitRun`: the model, its streams, the solver and what Phase 1's final contexts
are kept for. The recipe owns the `[solver]` table (which solver plugin runs Phase 1, and the
recipe's checks) and the `[phase2]` table. Phase 1's final contexts are kept beside the checkpoint
where Phase 2 or the context comparison reads them (`phase2.train_contexts = "phase1"`,
`phase2.compare_contexts`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl, hookspec
from newllm_kit.config import ComponentSection
from newllm_kit.errors import RunFailed
from newllm_kit.experiment import seed_everything
from newllm_kit.protocols import Column, EvalOutputs, Kept, RecipeResult, UnitContext, UnitData
from newllm_kit.training import TrainReport, TrainState, memory_phase, ppl

from ..metrics import EffectiveRankSettings, rank_rows
from . import phase1_contexts
from .checkpoint_fit import check_checkpoint, shapes
from .context_store import StorePlan, context_stores, is_out_of_memory, out_of_memory_message, plan_stores
from .contract import CVFPModel, Phase1Report, Solver, SolveResult, accepts
from .decode import INPUT_PREFIX, CVFPDecoder
from .diagnostics import diagnostic_warnings, seed_diagnostics, stats_rows
from .flops import phase1_flops, unit_flops
from .phase2 import (
    Phase2Data,
    Phase2Settings,
    context_agreement,
    input_weights,
    resolve_batch,
    store_rows,
    train_phase2,
    weights_as,
)
from .phase2 import (
    evaluate as evaluate_phase2,
)
from .row_map import RowMap, gather
from .solve_checkpoint import StoreCheckpoint, TrialsCheckpoint, rows_file
from .split_phase1 import phase1_solver

NON_CONTRACTING = "the ContextBlock does not contract"
ER_ROWS = EffectiveRankSettings().max_rows  # rows of a stream gathered for its effective rank


class SolverSection(ComponentSection):
    """The `[solver]` table: the solver plugin that runs Phase 1 (its own keys beside `name`), and checks."""

    kind: ClassVar[str] = "solver"
    protocol: ClassVar[type] = Solver

    name: str = Field("cvfp", description="Fixed-point solver plugin name (Phase 1).")
    skip_phase2_if_identity: bool = Field(
        False, description="Skip Phase 2 when the frozen block is close to an identity mapping, as the "
                           "reference did (False: record and warn).")
    val_convergence_trials: int = Field(
        10, ge=0, le=1000, description="Sequential validation rollouts of the convergence check (spec §3.6); "
                                       "0 skips it.")
    checkpoint_every: float = Field(
        300, ge=0, le=7 * 24 * 3600,
        description="Seconds of work between saves of a frozen rollout's progress and of the validation trials "
                    "(a killed unit loses at most this much; finished solves are always saved).")


class CVFPRecipeSettings(BaseModel):
    """The tables the cvfp recipe owns."""

    model_config = ConfigDict(extra="forbid")

    solver: SolverSection = Field(default_factory=lambda: SolverSection())
    phase2: Phase2Settings = Field(default_factory=lambda: Phase2Settings())


COLUMNS = [Column("train_er", "Train ER", percent=True, mean=True), Column("phase1_iterations", "Phase-1 it."),
           Column("best_epoch", "Best epoch"), Column("train_flops", "FLOPs")]


def _stopped_by(report: Phase1Report) -> str | None:
    """"converged" or "max_iterations" (None when the solver does not say)."""
    return None if report.converged is None else "converged" if report.converged else "max_iterations"


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


@contextmanager
def out_of_memory(unit: str, phase: str, plan: StorePlan, fix: str) -> Iterator[None]:
    """Out of memory in `phase` ends the run in one line: the unit and phase, what the context stores
    take, and the settings that lower it."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise RunFailed(out_of_memory_message(unit, phase, error, plan, fix)) from error


@dataclass
class UnitRun:
    """What every stage of one unit reads, and the notes they leave for the results."""

    settings: CVFPRecipeSettings
    module: nn.Module
    model: CVFPModel  # the same object as `module`, seen through the recipe's contract
    unit: UnitContext
    solver: Solver
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    inputs: dict[str, torch.Tensor]  # the weights the token inputs read, as solved (`phase2.input_weights`)
    fast: bool  # Phase 2 trains on Phase 1's final contexts (phase2.train_contexts = "phase1")
    compared: int  # training positions of the phase1-vs-rollout comparison (0: none)
    kept: Path  # the checkpoint folder, where each rank keeps its part of Phase 1's first `keep` contexts
    notes: list[str] = field(default_factory=list)
    val_documents: np.ndarray | None = None  # spans of the validation documents: Phase 2 evaluates per document
    dev_ids: torch.Tensor | None = None  # the development stream Phase 2 early-stops on, where there is one
    dev_documents: np.ndarray | None = None
    selected: EvalOutputs | None = None  # Phase 2's best epoch on the development stream, where it read one

    @classmethod
    def start(cls, settings: CVFPRecipeSettings, model: nn.Module, data: UnitData, unit: UnitContext) -> UnitRun:
        cvfp, p2 = cast(CVFPModel, model), settings.phase2  # the architecture's contract, checked by name
        solver = phase1_solver(settings.solver.build(), model, data.train_documents)
        inputs = input_weights(cvfp, data.train_ids)  # before a Phase-2 checkpoint may load trained ones
        compared = min(p2.compare_tokens, data.train_ids.numel() - 1) if p2.compare_contexts else 0
        return cls(settings, model, cvfp, unit, solver, data.train_ids, data.val_ids, inputs,
                   fast=p2.train_contexts == "phase1", compared=compared,
                   kept=unit.checkpoint.file(phase1_contexts.FILE).parent, val_documents=data.val_documents,
                   dev_ids=data.dev_ids, dev_documents=data.dev_documents)

    @property
    def streams(self) -> dict[str, torch.Tensor]:
        """The streams solved frozen for Phase 2: training, validation and (where set) development."""
        return {"train": self.train_ids, "val": self.val_ids, **({} if self.dev_ids is None else {"dev": self.dev_ids})}

    @property
    def keep(self) -> int:
        """Rows of Phase 1's final contexts that outlive Phase 1: all of them for the fast Phase-2 path, the
        compared ones for the comparison with the rollout, else none."""
        return self.train_ids.numel() if self.fast else self.compared

    def say(self, note: str) -> None:
        """A note for the user now and for the results."""
        self.unit.message(note)
        self.notes.append(note)


@dataclass
class Phase1Done:
    """What Phase 1 leaves, run or read back from a checkpoint."""

    summary: dict[str, Any]  # PHASE1_KEYS, the stop and its target: what the checkpoint keeps of Phase 1
    phase2_start: TrainState | None = None  # where a resumed Phase 2 continues
    checked: dict[str, Any] | None = None  # diagnostics and context agreement, once done (kept on resume)


@dataclass
class Solved:
    """Both streams' frozen contexts (in the open stores) and how they were obtained."""

    plan: StorePlan
    rows: dict[str, RowMap]  # the rows of each stream this rank's store holds
    train: SolveResult
    val: SolveResult
    agreement: dict[str, float] | None  # phase1 vs rollout contexts (phase2.compare_contexts)
    seconds: float
    dev: SolveResult | None = None


@dataclass
class Diagnosed:
    """The seed's diagnostics of the frozen block, and the decision they drive."""

    values: dict[str, Any]
    skip_phase2: bool


@dataclass
class Phase2Done:
    """Phase 2's report (an empty one when it was skipped) and its wall time."""

    report: TrainReport  # its `val` carries the unit's validation contexts as extras
    seconds: float


class CVFPRecipe:
    """Phase 1 → freeze → frozen solves → diagnostics → Phase 2, resumable after each stage."""

    model_protocol: ClassVar[type] = CVFPModel  # checked by name when an experiment file is loaded

    def __init__(self, settings: CVFPRecipeSettings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPRecipeSettings()

    def train(self, model: nn.Module, data: UnitData, unit: UnitContext) -> RecipeResult:
        run = UnitRun.start(self.settings, model, data, unit)
        phase1 = self._resume(run) or self._phase1(run)
        self._freeze(run)
        with self._solves(run, phase1) as solved:
            diagnosed = self._diagnose(run, phase1, solved)
            phase2 = self._phase2(run, phase1, solved, diagnosed)
        return self._record(run, phase1, solved, diagnosed, phase2)

    def _resume(self, run: UnitRun) -> Phase1Done | None:
        """The checkpoint's weights, Phase-1 summary, diagnostics and Phase-2 state, or None when there is
        none that fits (damaged or missing files of kept contexts discard it: the unit starts over)."""
        unit, runner = run.unit, run.unit.runner
        expected = shapes(unit.checkpoint.model_state(run.module))
        saved = unit.checkpoint.load(lambda saved: check_checkpoint(run.module, expected, self.settings.phase2, saved))
        if saved is None:
            return None
        if run.keep and not phase1_contexts.readable(run.kept, run.keep, run.model.context_dim, runner):
            unit.message(f"warning: Phase 1's contexts in {run.kept} are missing or damaged; starting the unit over")
            runner.barrier()  # every rank has looked before rank 0 removes the folder
            if runner.rank == 0:
                unit.checkpoint.discard()
            return None
        run.module.load_state_dict(saved.tensors["model"], strict=False)
        phase2_start = None
        if "phase2" in saved.state:
            phase2_start = TrainState.from_checkpoint(saved.tensors["phase2"], saved.state["phase2"])
        checked = saved.state.get("checked")
        unit.message(f"resumed from checkpoint ({'phase 2' if phase2_start else saved.stage})")
        return Phase1Done(saved.state["phase1"], phase2_start, checked if isinstance(checked, dict) else None)

    @staticmethod
    def _phase1(run: UnitRun) -> Phase1Done:
        """Phase 1 and its summary, checkpointed with the first `run.keep` rows of its final contexts (each
        rank its own part). The Train ER reads a sample of rows gathered from the ranks; the contexts are
        dropped here, before any Phase-2 store exists."""
        model, unit, runner = run.model, run.unit, run.unit.runner
        n = run.train_ids.numel()
        started = time.perf_counter()
        with memory_phase(runner, "phase1"):  # under ddp: the rank's time and waits of the whole phase
            report = run.solver.fit(model, run.train_ids, runner, unit.progress)
        seconds = time.perf_counter() - started
        picked = rank_rows(n, ER_ROWS, unit.seed)
        if report.rows is None:  # the solver left the whole stream on every rank
            sample, mine = report.contexts[picked.to(report.contexts.device)].cpu(), runner.shard(n)
            kept = report.contexts[mine.start:max(mine.start, min(mine.stop, run.keep))]
        else:
            mine = report.rows
            sample = gather(report.contexts, RowMap.of(n, mine), picked, runner)
            kept = report.contexts[:max(0, min(mine.stop, run.keep) - mine.start)]
        train = EvalOutputs(seed=unit.seed, extras={"contexts": sample, "context_width": model.context_dim})
        summary = {"iterations": report.iterations, "convergence_rate": report.convergence_rate,
                   "token_evaluations": report.token_evaluations, "seconds": seconds,
                   "flops": phase1_flops(model, report),
                   "train_er": unit.metrics(train).get("effective_rank", float("nan")),
                   "stopped_by": _stopped_by(report), "target_rate": report.target_rate,
                   "rate_note": report.rate_note}
        if report.converged is False:
            unit.message(f"Phase 1 stopped at max_iterations ({report.iterations}) with "
                         f"{report.convergence_rate:.0%} of tokens converged (target "
                         f"{report.target_rate:.0%}); its contexts are not at a fixed point")
        del report, train
        if run.keep:
            unit.checkpoint.write_stream(phase1_contexts.file_name(runner),
                                         lambda handle: phase1_contexts.write(handle, kept, mine.start))
            runner.barrier()  # every rank's part is on disk before the checkpoint that needs them
        unit.checkpoint.save("phase1", {"model": unit.checkpoint.model_state(run.module)}, {"phase1": summary})
        return Phase1Done(summary)

    @staticmethod
    def _freeze(run: UnitRun) -> None:
        """From here on the ContextBlock is fixed: the solves read it and Phase 2 trains the rest."""
        for parameter in run.model.param_groups()["phase1"]:
            parameter.requires_grad_(False)

    @contextmanager
    def _solves(self, run: UnitRun, phase1: Phase1Done) -> Iterator[Solved]:
        """The context stores, open while the caller runs diagnostics and Phase 2, holding both streams'
        frozen contexts: under ddp each rank's store holds only the rows its Phase-2 slices read. A
        finished solve is read back from its checkpoint files, a started rollout continues; the fast
        path's training contexts are Phase 1's, read back from the kept files. The solves' warnings
        become one note each."""
        unit, runner, model, solver = run.unit, run.unit.runner, run.module, run.solver
        batch = resolve_batch(self.settings.phase2.batch_size, run.model, runner)
        rows = {name: store_rows(ids.numel(), batch if name == "train" else None, runner)
                for name, ids in run.streams.items()}
        if runner.world_size > 1 and not accepts(solver.solve, "where"):
            rows = {name: RowMap.whole(ids.numel()) for name, ids in run.streams.items()}
            run.say(f"the solver does not take `where`: every rank stores the whole streams "
                    f"({type(solver).__name__}.solve)")
        sizes = {name: where.rows for name, where in rows.items()}
        plan = plan_stores(runner, sizes, run.model.context_dim, unit.scratch)
        unit.message(plan.describe())
        seed_everything(unit.seed + 1)  # solves after Phase 1 see the same RNG on resume
        solved_here = [name for name in rows if name != "train" or not run.fast]  # a disk store of these: its file
        kept = {name: unit.checkpoint.file(rows_file(name, runner)) for name in solved_here}
        with context_stores(plan, sizes, run.model.context_dim, runner, unit.id, unit.scratch, kept) as stores:
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught, weights_as(model, run.inputs), \
                    memory_phase(runner, "solves"):  # OOM: the solver says
                warnings.simplefilter("always")
                if run.fast:
                    phase1_contexts.read_into(run.kept, stores["train"], rows["train"], runner)
                    train = SolveResult([stores["train"]], "phase1", 0, 0, time.perf_counter() - started)
                else:
                    train = self._solve(run, "train", run.train_ids, stores["train"], rows["train"], plan)
                val = self._solve(run, "val", run.val_ids, stores["val"], rows["val"], plan)
                dev = None if run.dev_ids is None else self._solve(run, "dev", run.dev_ids, stores["dev"],
                                                                   rows["dev"], plan)
                checked = phase1.checked
                agreement = (checked["agreement"] if checked is not None else
                             self._agreement(run, stores["train"], rows["train"]) if run.compared else None)
            solved = Solved(plan, rows, train, val, agreement, time.perf_counter() - started, dev)
            notes = _solve_notes([str(w.message) for w in caught],
                                 {"train": train, "val": val, **({} if dev is None else {"dev": dev})})
            if run.fast:
                notes.insert(0, "Phase-2 training contexts are F(P_{i-1}, x_i) of Phase 1's final contexts "
                                "(phase2.train_contexts = \"phase1\"): no rollout over the training stream")
            if agreement is not None:
                notes.append(f"phase1 vs rollout contexts on the first {run.compared:,} training tokens: mean "
                             f"cosine {agreement['mean_cosine']:.4f}, min {agreement['min_cosine']:.4f}, "
                             f"MSE {agreement['mse']:.3g}")
            for note in notes:
                run.say(note)
            yield solved

    def _solve(self, run: UnitRun, name: str, ids: torch.Tensor, store: torch.Tensor, where: RowMap,
               plan: StorePlan) -> SolveResult:
        """One stream's frozen solve into `store`: read back when a checkpoint holds it finished, else
        solved (a started rollout continues where it was saved) and saved."""
        unit, solver = run.unit, run.solver
        saved = StoreCheckpoint(unit.checkpoint, name, store, where, unit.runner,
                                self.settings.solver.checkpoint_every, unit.message, in_place=plan.kind == "disk")
        done = saved.completed()
        if done is not None:
            unit.message(f"{name} contexts read back from the checkpoint ({done.method} solve)")
            return done
        keywords: dict[str, Any] = {}
        if not where.is_whole:
            keywords["where"] = where
        if accepts(solver.solve, "progress"):
            keywords["progress"] = saved
        result = solver.solve(run.model, ids, unit.runner, out=store, **keywords)
        saved.finish(result)
        return result

    def _diagnose(self, run: UnitRun, phase1: Phase1Done, solved: Solved) -> Diagnosed:
        """The seed's diagnostics of the frozen block, one note per flagged one; an identity block skips
        Phase 2 where `solver.skip_phase2_if_identity` asks for it, as the reference did. Checkpointed
        with the context agreement, so a resumed unit does not run them again."""
        s, unit, runner = run.settings.solver, run.unit, run.unit.runner
        if phase1.checked is not None:
            values = phase1.checked["diagnostics"]
        else:
            trials = (f", {s.val_convergence_trials} sequential rollouts over the {run.val_ids.numel():,} "
                      f"validation tokens (solver.val_convergence_trials)" if s.val_convergence_trials else "")
            unit.message(f"diagnostics of the frozen block: identity check{trials}, context statistics")
            solves = {"train": solved.train, "val": solved.val}
            stores = {name: result.layers[-1] for name, result in solves.items()}
            sampled = {name: gather(stores[name], solved.rows[name], stats_rows(solved.rows[name].n, unit.seed),
                                    runner) for name in solves}
            progress = TrialsCheckpoint(unit.checkpoint, run.val_ids.numel(), run.model.context_dim,
                                        s.val_convergence_trials, runner, s.checkpoint_every)
            with weights_as(run.module, run.inputs), memory_phase(runner, "diagnostics"):
                values = seed_diagnostics(run.model, run.val_ids, sampled, solves, s.val_convergence_trials,
                                          unit.seed, unit.progress, progress)
            phase1.checked = {"diagnostics": values, "agreement": solved.agreement}
            unit.checkpoint.save("checked", {"model": unit.checkpoint.model_state(run.module)},
                                 {"phase1": phase1.summary, "checked": phase1.checked})
        skip = s.skip_phase2_if_identity and values["identity"]["identity"]
        for note in diagnostic_warnings(values) + (["Phase 2 skipped (solver.skip_phase2_if_identity)"]
                                                   if skip else []):
            run.say(note)
        return Diagnosed(values, skip)

    @staticmethod
    def _phase2(run: UnitRun, phase1: Phase1Done, solved: Solved, diagnosed: Diagnosed) -> Phase2Done:
        """Phase 2 on the stored contexts (from `phase1.phase2_start` on resume), checkpointed after every
        epoch; its validation outputs carry a sample of the val contexts for the metrics."""
        unit, model, p2, runner = run.unit, run.model, run.settings.phase2, run.unit.runner

        def checkpoint(state: TrainState) -> None:
            tensors, json_state = state.to_checkpoint()
            unit.checkpoint.save("phase2", {"model": unit.checkpoint.model_state(run.module), "phase2": tensors},
                                 {"phase1": phase1.summary, "checked": phase1.checked, "phase2": json_state})

        started = time.perf_counter()
        val = Phase2Data(solved.val.layers[-1], run.val_ids, run.inputs, solved.rows["val"], run.val_documents)
        selection = val if solved.dev is None else Phase2Data(solved.dev.layers[-1], cast(torch.Tensor, run.dev_ids),
                                                              run.inputs, solved.rows["dev"], run.dev_documents)
        with out_of_memory(unit.id, "phase 2", solved.plan, solved.plan.fix("phase2.batch_size lower")), \
                memory_phase(runner, "phase2"):
            report = TrainReport(0, 0, [], EvalOutputs(), 0.0) if diagnosed.skip_phase2 else train_phase2(
                model, Phase2Data(solved.train.layers[-1], run.train_ids, run.inputs, solved.rows["train"]),
                selection, p2, runner, unit.progress, start=phase1.phase2_start, on_epoch_end=checkpoint,
                stream="val" if solved.dev is None else "dev")
            if solved.dev is not None and not diagnosed.skip_phase2:  # early stopping read dev: val once, now
                run.selected = report.val
                report = replace(report, val=evaluate_phase2(model, val, p2, runner))
        seconds = time.perf_counter() - started
        # The val ER reads the rows the metric would sample, gathered: the store closes after this.
        val_rows = solved.rows["val"]
        report.val.extras = {"contexts": gather(solved.val.layers[-1], val_rows,
                                                rank_rows(val_rows.n, ER_ROWS, unit.seed), runner),
                             "context_width": model.context_dim,
                             "convergence_rate": phase1.summary["convergence_rate"]}
        report.val.seed = unit.seed
        return Phase2Done(report, seconds)

    @staticmethod
    def _record(run: UnitRun, phase1: Phase1Done, solved: Solved, diagnosed: Diagnosed, phase2: Phase2Done
                ) -> RecipeResult:
        """The unit's row of results.jsonl, its columns, notes and flags."""
        summary, report = phase1.summary, phase2.report
        record: dict[str, Any] = {
            "train_er": summary["train_er"],
            "phase1_iterations": summary["iterations"],
            "convergence_rate": summary["convergence_rate"],
            "phase1_stopped_by": summary.get("stopped_by"),
            "phase1_target_rate": summary.get("target_rate"),
            "phase1_rate_note": summary.get("rate_note"),
            "phase1_token_evaluations": summary["token_evaluations"],
            "best_epoch": report.best_epoch,
            "phase2_batch_size": report.batch_size,
            "epochs_run": report.epochs_run,
            "solve": {"method": solved.train.method, "gain": solved.train.gain, "iterations": solved.train.iterations},
            "seconds": {"phase1": summary["seconds"], "solve": solved.seconds, "phase2": phase2.seconds},
            **unit_flops(run.model, summary.get("flops"), {"train": solved.train, "val": solved.val, "dev": solved.dev},
                         report.epochs_run, {name: ids.numel() for name, ids in run.streams.items()}),
            "context_store": solved.plan.to_json(),
            "diagnostics": diagnosed.values,
            "phase2_skipped": diagnosed.skip_phase2,
            "phase1_splits": getattr(run.solver, "splits", None) or None,  # None: one split, or resumed after Phase 1
            "train_contexts": run.settings.phase2.train_contexts,
            "context_agreement": solved.agreement,
        }
        if run.selected is not None:  # what selected the epoch; `val` is the validation split's, scored once
            loss = run.selected.nll_sum / run.selected.count
            record |= {"dev_loss": loss, "dev_ppl": ppl(loss)}
        flags = {}
        if summary.get("stopped_by") == "max_iterations":
            flags["phase1_iterations"] = (f"Phase 1 stopped at max_iterations before reaching its target of "
                                          f"{summary['target_rate']:.0%} converged tokens (had "
                                          f"{summary['convergence_rate']:.0%})")
        return RecipeResult(val=report.val, record=record, columns=COLUMNS, notes=run.notes, flags=flags,
                            final_weights=report.final_weights, ends_on_best=report.ends_on_best,
                            kept_tensors={INPUT_PREFIX + k: v for k, v in run.inputs.items()})

    def decoder(self, model: nn.Module, kept: Kept) -> CVFPDecoder:
        """The kept model reading a stream by sequential rollout (`newllm_kit_plugins.cvfp.decode`)."""
        return CVFPDecoder(model, kept.tensors)

    def evaluate(self, model: nn.Module, data: UnitData, unit: UnitContext, kept: Kept) -> EvalOutputs:
        """The run's validation of a kept model on `data.val_ids`: the frozen solve by the unit's solver
        into a context store, then Phase 2's evaluation, with the val ER's sample of contexts."""
        cvfp, runner = cast(CVFPModel, model), unit.runner
        inputs = {k.removeprefix(INPUT_PREFIX): v.to(runner.device) for k, v in kept.tensors.items()
                  if k.startswith(INPUT_PREFIX)}
        solver = phase1_solver(self.settings.solver.build(), model, data.train_documents)
        where = store_rows(data.val_ids.numel(), None, runner)
        plan = plan_stores(runner, {"val": where.rows}, cvfp.context_dim, unit.scratch)
        with context_stores(plan, {"val": where.rows}, cvfp.context_dim, runner, unit.id, unit.scratch) as stores:
            seed_everything(unit.seed + 1)
            keywords: dict[str, Any] = {} if where.is_whole else {"where": where}
            with weights_as(model, inputs):
                solver.solve(cvfp, data.val_ids, runner, out=stores["val"], **keywords)
            val = evaluate_phase2(cvfp, Phase2Data(stores["val"], data.val_ids, inputs, where, data.val_documents),
                                  self.settings.phase2, runner)
            val.extras = {"contexts": gather(stores["val"], where, rank_rows(where.n, ER_ROWS, unit.seed), runner),
                          "context_width": cvfp.context_dim,
                          "convergence_rate": kept.record.get("convergence_rate", float("nan"))}
        val.seed = unit.seed
        return val

    @staticmethod
    def _agreement(run: UnitRun, store: torch.Tensor, where: RowMap) -> dict[str, float]:
        """Phase 1's final contexts against the sequential rollout on the first `run.compared` training
        positions (spec §7 item 7's check, per unit). P's first rows come from the kept files; the fast
        path's rollout of those rows is solved here (by every rank: a few thousand tokens), the rollout
        path's is gathered from the ranks' stores."""
        rows, ids, runner = run.compared, run.train_ids, run.unit.runner
        previous = torch.empty(rows, store.shape[1])
        phase1_contexts.read_into(run.kept, previous, RowMap(ids.numel(), ((0, rows),)), runner)
        if run.fast:
            rollout = run.solver.solve(run.model, ids[:rows], runner).layers[-1]
        else:
            rollout = gather(store, where, torch.arange(rows), runner)
        return context_agreement(run.model, Phase2Data(previous, ids, run.inputs), rollout, runner.device)


@hookspec
def register_solvers(register: Any) -> None:
    """Register fixed-point solvers for the cvfp recipe (kind `solver`, TOML `[solver] name = NAME`;
    the table's other keys are the settings). The contract is in `newllm_kit_plugins.cvfp.contract`.

    `factory(settings)` returns a `Solver`: `fit(model, ids, runner, progress) -> Phase1Report` trains
    the ContextBlock (Phase 1) and `solve(model, ids, runner, out=None) -> SolveResult` gives the
    frozen block's final-layer context of every position. `ids` are a stream's [n] token ids, not
    token inputs: compute the [b, T] token inputs of each chunk with
    `newllm_kit_plugins.cvfp.spans.token_span(model, ids, start, stop)`; nothing of size [n, T] may exist.

    Example::

        @hookimpl
        def register_solvers(register):
            register("anderson", AndersonSolver, settings=AndersonSettings)
    """


@hookimpl
def register_recipes(register: Any) -> None:
    register("cvfp", CVFPRecipe, settings=CVFPRecipeSettings,
             description="Phase 1 fixed-point training via [solver], frozen solves, Phase 2 via [phase2]")
