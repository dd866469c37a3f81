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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl, hookspec
from newllm_kit.config import ComponentSection
from newllm_kit.errors import RunFailed
from newllm_kit.experiment import seed_everything
from newllm_kit.protocols import Column, EvalOutputs, RecipeResult, UnitContext, UnitData
from newllm_kit.training import TrainReport, TrainState

from . import phase1_contexts
from .checkpoint_fit import check_checkpoint, shapes
from .context_store import StorePlan, context_stores, is_out_of_memory, out_of_memory_message, plan_stores
from .contract import CVFPModel, Phase1Report, Solver, SolveResult
from .diagnostics import diagnostic_warnings, seed_diagnostics
from .phase2 import (
    Phase2Data,
    Phase2Settings,
    context_agreement,
    input_weights,
    train_phase2,
    weights_as,
)
from .split_phase1 import phase1_solver

NON_CONTRACTING = "the ContextBlock does not contract"


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


class CVFPRecipeSettings(BaseModel):
    """The tables the cvfp recipe owns."""

    model_config = ConfigDict(extra="forbid")

    solver: SolverSection = Field(default_factory=lambda: SolverSection())
    phase2: Phase2Settings = Field(default_factory=lambda: Phase2Settings())


COLUMNS = [Column("train_er", "Train ER", percent=True, mean=True), Column("phase1_iterations", "Phase-1 it."),
           Column("best_epoch", "Best epoch")]


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
    kept_file: Path  # Phase 1's first `keep` final contexts, beside the checkpoint
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, settings: CVFPRecipeSettings, model: nn.Module, data: UnitData, unit: UnitContext) -> UnitRun:
        cvfp, p2 = cast(CVFPModel, model), settings.phase2  # the architecture's contract, checked by name
        solver = phase1_solver(settings.solver.build(), model, data.train_documents)
        inputs = input_weights(cvfp, data.train_ids)  # before a Phase-2 checkpoint may load trained ones
        compared = min(p2.compare_tokens, data.train_ids.numel() - 1) if p2.compare_contexts else 0
        return cls(settings, model, cvfp, unit, solver, data.train_ids, data.val_ids, inputs,
                   fast=p2.train_contexts == "phase1", compared=compared,
                   kept_file=unit.checkpoint.file(phase1_contexts.FILE))

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


@dataclass
class Solved:
    """Both streams' frozen contexts (in the open stores) and how they were obtained."""

    plan: StorePlan
    train: SolveResult
    val: SolveResult
    agreement: dict[str, float] | None  # phase1 vs rollout contexts (phase2.compare_contexts)
    seconds: float


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
        with self._solves(run) as solved:
            diagnosed = self._diagnose(run, solved)
            phase2 = self._phase2(run, phase1, solved, diagnosed)
        return self._record(run, phase1, solved, diagnosed, phase2)

    def _resume(self, run: UnitRun) -> Phase1Done | None:
        """The checkpoint's weights, Phase-1 summary and Phase-2 state, or None when there is none that
        fits (a damaged or missing file of kept contexts discards it: the unit starts over)."""
        unit, runner = run.unit, run.unit.runner
        expected = shapes(unit.checkpoint.model_state(run.module))
        saved = unit.checkpoint.load(lambda saved: check_checkpoint(run.module, expected, self.settings.phase2, saved))
        if saved is None:
            return None
        if run.keep and not phase1_contexts.readable(run.kept_file, run.keep, run.model.context_dim, runner):
            unit.message(f"warning: {run.kept_file} is missing or damaged; starting the unit over")
            if runner.rank == 0:
                unit.checkpoint.discard()
            return None
        run.module.load_state_dict(saved.tensors["model"], strict=False)
        phase2_start = None
        if "phase2" in saved.state:
            phase2_start = TrainState.from_checkpoint(saved.tensors["phase2"], saved.state["phase2"])
        unit.message(f"resumed from checkpoint ({'phase 2' if phase2_start else 'phase 1 done'})")
        return Phase1Done(saved.state["phase1"], phase2_start)

    @staticmethod
    def _phase1(run: UnitRun) -> Phase1Done:
        """Phase 1 and its summary, checkpointed with the first `run.keep` rows of its final contexts. The
        rest of the [n, C] training contexts is needed only for the Train ER, so it is dropped here,
        before any Phase-2 store exists."""
        model, unit = run.model, run.unit
        started = time.perf_counter()
        report = run.solver.fit(model, run.train_ids, unit.runner, unit.progress)
        seconds = time.perf_counter() - started
        train = EvalOutputs(seed=unit.seed, extras={"contexts": report.contexts, "context_width": model.context_dim})
        summary = {"iterations": report.iterations, "convergence_rate": report.convergence_rate,
                   "token_evaluations": report.token_evaluations, "seconds": seconds,
                   "train_er": unit.metrics(train).get("effective_rank", float("nan")),
                   "stopped_by": _stopped_by(report), "target_rate": report.target_rate,
                   "rate_note": report.rate_note}
        if report.converged is False:
            unit.message(f"Phase 1 stopped at max_iterations ({report.iterations}) with "
                         f"{report.convergence_rate:.0%} of tokens converged (target "
                         f"{report.target_rate:.0%}); its contexts are not at a fixed point")
        kept = report.contexts[:run.keep]
        del report, train
        if unit.runner.rank == 0 and run.keep:
            unit.checkpoint.write_stream(phase1_contexts.FILE, lambda handle: phase1_contexts.write(handle, kept))
        unit.checkpoint.save("phase1", {"model": unit.checkpoint.model_state(run.module)}, {"phase1": summary})
        return Phase1Done(summary)

    @staticmethod
    def _freeze(run: UnitRun) -> None:
        """From here on the ContextBlock is fixed: the solves read it and Phase 2 trains the rest."""
        for parameter in run.model.param_groups()["phase1"]:
            parameter.requires_grad_(False)

    @contextmanager
    def _solves(self, run: UnitRun) -> Iterator[Solved]:
        """The context stores, open while the caller runs diagnostics and Phase 2, holding both streams'
        frozen contexts (the fast path's training contexts are Phase 1's, read back from the kept file);
        the solves' warnings become one note each."""
        unit, runner, model, solver = run.unit, run.unit.runner, run.module, run.solver
        sizes = {"train": run.train_ids.numel(), "val": run.val_ids.numel()}
        plan = plan_stores(runner, sum(sizes.values()), run.model.context_dim, unit.scratch)
        unit.message(plan.describe())
        seed_everything(unit.seed + 1)  # solves after Phase 1 see the same RNG on resume
        with context_stores(plan, sizes, run.model.context_dim, runner, unit.id, unit.scratch) as stores:
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught, weights_as(model, run.inputs):  # OOM: the solver says
                warnings.simplefilter("always")
                if run.fast:
                    phase1_contexts.read_into(run.kept_file, stores["train"], runner)
                    train = SolveResult([stores["train"]], "phase1", 0, 0, time.perf_counter() - started)
                else:
                    train = solver.solve(model, run.train_ids, runner, out=stores["train"])
                val = solver.solve(model, run.val_ids, runner, out=stores["val"])
                agreement = self._agreement(run, stores["train"]) if run.compared else None
            solved = Solved(plan, train, val, agreement, time.perf_counter() - started)
            notes = _solve_notes([str(w.message) for w in caught], {"train": train, "val": val})
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

    @staticmethod
    def _diagnose(run: UnitRun, solved: Solved) -> Diagnosed:
        """The seed's diagnostics of the frozen block, one note per flagged one; an identity block skips
        Phase 2 where `solver.skip_phase2_if_identity` asks for it, as the reference did."""
        s, unit = run.settings.solver, run.unit
        trials = (f", {s.val_convergence_trials} sequential rollouts over the {run.val_ids.numel():,} validation "
                  f"tokens (solver.val_convergence_trials)" if s.val_convergence_trials else "")
        unit.message(f"diagnostics of the frozen block: identity check{trials}, context statistics")
        with weights_as(run.module, run.inputs):
            values = seed_diagnostics(run.model, run.val_ids, {"train": solved.train, "val": solved.val},
                                      s.val_convergence_trials, unit.seed, unit.progress)
        skip = s.skip_phase2_if_identity and values["identity"]["identity"]
        for note in diagnostic_warnings(values) + (["Phase 2 skipped (solver.skip_phase2_if_identity)"]
                                                   if skip else []):
            run.say(note)
        return Diagnosed(values, skip)

    @staticmethod
    def _phase2(run: UnitRun, phase1: Phase1Done, solved: Solved, diagnosed: Diagnosed) -> Phase2Done:
        """Phase 2 on the stored contexts (from `phase1.phase2_start` on resume), checkpointed after every
        epoch; its validation outputs carry the val contexts for the metrics."""
        unit, model, p2 = run.unit, run.model, run.settings.phase2

        def checkpoint(state: TrainState) -> None:
            tensors, json_state = state.to_checkpoint()
            unit.checkpoint.save("phase2", {"model": unit.checkpoint.model_state(run.module), "phase2": tensors},
                                 {"phase1": phase1.summary, "phase2": json_state})

        started = time.perf_counter()
        with out_of_memory(unit.id, "phase 2", solved.plan, solved.plan.fix("phase2.batch_size lower")):
            report = TrainReport(0, 0, [], EvalOutputs(), 0.0) if diagnosed.skip_phase2 else train_phase2(
                model, Phase2Data(solved.train.layers[-1], run.train_ids, run.inputs),
                Phase2Data(solved.val.layers[-1], run.val_ids, run.inputs), p2, unit.runner,
                unit.progress, start=phase1.phase2_start, on_epoch_end=checkpoint)
        seconds = time.perf_counter() - started
        # The val ER reads the store Phase 2 evaluated; a copy outlives the store (val streams are small).
        report.val.extras = {"contexts": solved.val.layers[-1].to("cpu", torch.float32, copy=True),
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
            "context_store": solved.plan.to_json(),
            "diagnostics": diagnosed.values,
            "phase2_skipped": diagnosed.skip_phase2,
            "phase1_splits": getattr(run.solver, "splits", None) or None,  # None: one split, or resumed after Phase 1
            "train_contexts": run.settings.phase2.train_contexts,
            "context_agreement": solved.agreement,
        }
        flags = {}
        if summary.get("stopped_by") == "max_iterations":
            flags["phase1_iterations"] = (f"Phase 1 stopped at max_iterations before reaching its target of "
                                          f"{summary['target_rate']:.0%} converged tokens (had "
                                          f"{summary['convergence_rate']:.0%})")
        return RecipeResult(val=report.val, record=record, columns=COLUMNS, notes=run.notes, flags=flags)

    @staticmethod
    def _agreement(run: UnitRun, store: torch.Tensor) -> dict[str, float]:
        """Phase 1's final contexts against the sequential rollout on the first `run.compared` training
        positions (spec §7 item 7's check, per unit). The fast path's store is P, so the rollout is solved
        for those rows; the rollout path's store is the rollout, and P's first rows were kept in a file."""
        rows, ids, runner = run.compared, run.train_ids, run.unit.runner
        if run.fast:
            previous = store[:rows]
            rollout = run.solver.solve(run.model, ids[:rows], runner).layers[-1]
        else:
            previous = torch.empty(rows, store.shape[1])
            phase1_contexts.read_into(run.kept_file, previous, runner)
            rollout = store[:rows]
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
