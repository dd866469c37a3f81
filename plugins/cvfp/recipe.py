"""The `cvfp` recipe: Phase 1 (fixed-point training of the ContextBlock through a solver), freeze,
frozen solves of both streams, the seed's diagnostics, then Phase 2 (the TokenBlock) on those contexts.

It owns the `[solver]` table (which solver plugin runs Phase 1, and the recipe's checks) and the
`[phase2]` table. Checkpoints after Phase 1 and after every Phase-2 epoch let a killed unit resume;
Phase 1's final contexts are kept beside the checkpoint where Phase 2 or the context comparison
reads them (`phase2.train_contexts = "phase1"`, `phase2.compare_contexts`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl, hookspec
from newllm_kit.config import ComponentSection
from newllm_kit.errors import RunFailed
from newllm_kit.experiment import seed_everything
from newllm_kit.protocols import Column, EvalOutputs, RecipeResult, Saved, UnitContext, UnitData
from newllm_kit.training import TrainReport, TrainState

from . import phase1_contexts
from .context_store import StorePlan, context_stores, is_out_of_memory, out_of_memory_message, plan_stores
from .contract import CVFPModel, Phase1Report, Solver, SolveResult
from .diagnostics import diagnostic_warnings, seed_diagnostics
from .phase2 import Phase2Data, Phase2Settings, context_agreement, input_weights, train_phase2, weights_as
from .split_phase1 import phase1_solver

PHASE1_KEYS = {"iterations", "convergence_rate", "token_evaluations", "seconds", "train_er"}
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


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


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


class CVFPRecipe:
    """Phase 1 → freeze → frozen solves → diagnostics → Phase 2, resumable after each stage."""

    model_protocol: ClassVar[type] = CVFPModel  # checked by name when an experiment file is loaded

    def __init__(self, settings: CVFPRecipeSettings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPRecipeSettings()

    def train(self, model: nn.Module, data: UnitData, unit: UnitContext) -> RecipeResult:
        cvfp: CVFPModel = model  # type: ignore[assignment]  # the architecture's contract, checked by name below
        s, p2 = self.settings.solver, self.settings.phase2
        runner = unit.runner
        solver = phase1_solver(s.build(), model, data.train_documents)
        train_ids, val_ids = data.train_ids, data.val_ids
        inputs = input_weights(cvfp, train_ids)  # before a Phase-2 checkpoint may load trained ones

        # Phase 1's final contexts outlive Phase 1 where Phase 2 reads them (train_contexts = "phase1") or
        # the comparison with the rollout does: saved beside the checkpoints, read back on every start.
        fast = p2.train_contexts == "phase1"
        compared = min(p2.compare_tokens, train_ids.numel() - 1) if p2.compare_contexts else 0
        keep = train_ids.numel() if fast else compared
        kept_file = unit.checkpoint.file(phase1_contexts.FILE)
        expected = _shapes(unit.checkpoint.model_state(model))
        saved = unit.checkpoint.load(lambda saved: self._check(model, expected, saved))
        if saved is not None and keep and not phase1_contexts.readable(kept_file, keep, cvfp.context_dim, runner):
            unit.message(f"warning: {kept_file} is missing or damaged; starting the unit over")
            if runner.rank == 0:
                unit.checkpoint.discard()
            saved = None
        phase2_start: TrainState | None = None
        if saved is None:
            phase1, kept = self._phase1(cvfp, solver, train_ids, unit, keep)
            if runner.rank == 0 and keep:
                unit.checkpoint.write_stream(phase1_contexts.FILE, lambda handle: phase1_contexts.write(handle, kept))
            unit.checkpoint.save("phase1", {"model": unit.checkpoint.model_state(model)}, {"phase1": phase1})
            del kept
        else:
            phase1 = saved.state["phase1"]
            model.load_state_dict(saved.tensors["model"], strict=False)
            if "phase2" in saved.state:
                phase2_start = TrainState.from_checkpoint(saved.tensors["phase2"], saved.state["phase2"])
            unit.message(f"resumed from checkpoint ({'phase 2' if phase2_start else 'phase 1 done'})")

        for parameter in cvfp.param_groups()["phase1"]:
            parameter.requires_grad_(False)
        sizes = {"train": train_ids.numel(), "val": val_ids.numel()}
        plan = plan_stores(runner, sum(sizes.values()), cvfp.context_dim, unit.scratch)
        unit.message(plan.describe())
        seed_everything(unit.seed + 1)  # solves after Phase 1 see the same RNG on resume
        with context_stores(plan, sizes, cvfp.context_dim, runner, unit.id, unit.scratch) as stores:
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught, weights_as(model, inputs):  # OOM: the solver says
                warnings.simplefilter("always")
                if fast:
                    phase1_contexts.read_into(kept_file, stores["train"], runner)
                    train_solve = SolveResult([stores["train"]], "phase1", 0, 0, time.perf_counter() - started)
                else:
                    train_solve = solver.solve(model, train_ids, runner, out=stores["train"])
                val_solve = solver.solve(model, val_ids, runner, out=stores["val"])
                agreement = (self._agreement(cvfp, solver, train_ids, stores["train"], kept_file, compared, fast,
                                             inputs, unit) if compared else None)
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
                unit.message(note)
            with weights_as(model, inputs):
                diagnostics = seed_diagnostics(cvfp, val_ids, {"train": train_solve, "val": val_solve},
                                               s.val_convergence_trials, unit.seed)
            skip_phase2 = s.skip_phase2_if_identity and diagnostics["identity"]["identity"]
            for note in diagnostic_warnings(diagnostics) + (["Phase 2 skipped (solver.skip_phase2_if_identity)"]
                                                           if skip_phase2 else []):
                unit.message(note)
                notes.append(note)

            def checkpoint(state: TrainState) -> None:
                tensors, json_state = state.to_checkpoint()
                unit.checkpoint.save("phase2", {"model": unit.checkpoint.model_state(model), "phase2": tensors},
                                     {"phase1": phase1, "phase2": json_state})

            started = time.perf_counter()
            with out_of_memory(unit.id, "phase 2", plan, plan.fix("phase2.batch_size lower")):
                report2 = TrainReport(0, 0, [], EvalOutputs(), 0.0) if skip_phase2 else train_phase2(
                    cvfp, Phase2Data(train_solve.layers[-1], train_ids, inputs),
                    Phase2Data(val_solve.layers[-1], val_ids, inputs), p2, runner,
                    unit.progress, start=phase2_start, on_epoch_end=checkpoint)
            phase2_seconds = time.perf_counter() - started
            val = report2.val
            # The val ER reads the store Phase 2 evaluated; a copy outlives the store (val streams are small).
            val.extras = {"contexts": val_solve.layers[-1].to("cpu", torch.float32, copy=True),
                          "context_width": cvfp.context_dim, "convergence_rate": phase1["convergence_rate"]}
            val.seed = unit.seed
        record: dict[str, Any] = {
            "train_er": phase1["train_er"],
            "phase1_iterations": phase1["iterations"],
            "convergence_rate": phase1["convergence_rate"],
            "phase1_stopped_by": phase1.get("stopped_by"),
            "phase1_target_rate": phase1.get("target_rate"),
            "phase1_token_evaluations": phase1["token_evaluations"],
            "best_epoch": report2.best_epoch,
            "phase2_batch_size": report2.batch_size,
            "epochs_run": report2.epochs_run,
            "solve": {"method": train_solve.method, "gain": train_solve.gain, "iterations": train_solve.iterations},
            "seconds": {"phase1": phase1["seconds"], "solve": solve_seconds, "phase2": phase2_seconds},
            "context_store": plan.to_json(),
            "diagnostics": diagnostics,
            "phase2_skipped": skip_phase2,
            "phase1_splits": getattr(solver, "splits", None) or None,  # None: one split, or resumed after Phase 1
            "train_contexts": p2.train_contexts,
            "context_agreement": agreement,
        }
        flags = {}
        if phase1.get("stopped_by") == "max_iterations":
            flags["phase1_iterations"] = (f"Phase 1 stopped at max_iterations before reaching its target of "
                                          f"{phase1['target_rate']:.0%} converged tokens (had "
                                          f"{phase1['convergence_rate']:.0%})")
        return RecipeResult(val=val, record=record, columns=COLUMNS, notes=notes, flags=flags)

    @staticmethod
    def _check(model: nn.Module, expected: dict[str, Any], saved: Saved) -> None:
        """A checkpoint fits when its weights, Phase-1 summary and Phase-2 state match the model."""
        weights, phase1 = saved.tensors["model"], saved.state["phase1"]
        if not PHASE1_KEYS <= set(phase1):
            raise ValueError("its phase-1 summary is incomplete")
        if _shapes(weights) != expected:
            raise ValueError("its weights do not fit the model")
        if "phase2" in saved.state:
            state = TrainState.from_checkpoint(saved.tensors["phase2"], saved.state["phase2"])
            trained = _shapes(dict(model.named_parameters())).items()
            if not (_shapes(state.model).items() <= trained and _shapes(state.best_weights).items() <= trained):
                raise ValueError("its phase-2 weights do not fit the model")

    @staticmethod
    def _phase1(model: CVFPModel, solver: Solver, ids: torch.Tensor, unit: UnitContext, keep: int
                ) -> tuple[dict[str, Any], torch.Tensor]:
        """Phase 1, its summary and the first `keep` rows of its final contexts (all of them for the
        fast Phase-2 path, a few for the context comparison). The rest of the [n, C] training contexts
        is needed only for the Train ER, so it is dropped here, before any Phase-2 store exists."""
        started = time.perf_counter()
        report = solver.fit(model, ids, unit.runner, unit.progress)
        seconds = time.perf_counter() - started
        train = EvalOutputs(seed=unit.seed, extras={"contexts": report.contexts, "context_width": model.context_dim})
        phase1 = {"iterations": report.iterations, "convergence_rate": report.convergence_rate,
                  "token_evaluations": report.token_evaluations, "seconds": seconds,
                  "train_er": unit.metrics(train).get("effective_rank", float("nan")),
                  "stopped_by": _stopped_by(report), "target_rate": report.target_rate}
        if report.converged is False:
            unit.message(f"Phase 1 stopped at max_iterations ({report.iterations}) with "
                         f"{report.convergence_rate:.0%} of tokens converged (target "
                         f"{report.target_rate:.0%}); its contexts are not at a fixed point")
        kept = report.contexts[:keep]
        del report, train
        return phase1, kept

    @staticmethod
    def _agreement(model: CVFPModel, solver: Solver, ids: torch.Tensor, store: torch.Tensor, kept_file: Any,
                   rows: int, fast: bool, inputs: dict[str, torch.Tensor], unit: UnitContext) -> dict[str, float]:
        """Phase 1's final contexts against the sequential rollout on the first `rows` training positions
        (spec §7 item 7's check, per unit). The fast path's store is P, so the rollout is solved for those
        rows; the rollout path's store is the rollout, and P's first rows were kept in `kept_file`."""
        if fast:
            previous = store[:rows]
            rollout = solver.solve(model, ids[:rows], unit.runner).layers[-1]
        else:
            previous = torch.empty(rows, store.shape[1])
            phase1_contexts.read_into(kept_file, previous, unit.runner)
            rollout = store[:rows]
        return context_agreement(model, Phase2Data(previous, ids, inputs), rollout, unit.runner.device)


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
