"""The Phase-1 solver `cvfp` (`CVFPPhase1Solver`): fixed-point training of the ContextBlock (spec §3)
and frozen solves.

Phase 1 alternates one parallel ("Jacobi") pass over the whole stream with one Adam step: every
token's incoming context is the previous pass's output of the token before it (wrap-around at
position 0), plus noise, and the loss pulls each output towards the previous pass's output at
the same position while a diversity term keeps the contexts apart. A pass overwrites one [n, C]
buffer chunk by chunk (`jacobi_pass.InPlacePass`), so it holds one context per token plus
O(chunk). The frozen solves (the contexts Phase 2 reads) live in `frozen_solve`.

`fit` is the one Phase-1 loop of both built-in solvers: what changes from pass to pass (the rows a
pass works on, its step size and noise, which tokens count as converged) is a `PassSchedule`, and
the `gradual-decrease` solver only brings its own (`gradual_decrease.ShrinkingSchedule`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from newllm_kit import hookimpl
from newllm_kit.errors import RunFailed, UserError
from newllm_kit.protocols import Collectives, Placement, Progress, Runner
from newllm_kit.training import sum_gradients

from .context_store import decide, free_bytes, is_out_of_memory, settings_of
from .contract import Phase1Report, SolveResult
from .frozen_solve import BLOCK, RolloutProgress, full_precision_matmuls, solve_frozen
from .jacobi_pass import InPlacePass, Rows, Sweep, with_oom_retry
from .row_map import RowMap

MAX_ITERATIONS = 1_000_000  # each pass sweeps the whole stream: far beyond any real budget
MAX_BATCH = 10**9
RANDOM_ROWS = 8192  # rows per block of the random iteration 0: a multiple of 16, so blocks draw what one
# [n, C] randn draws (the CPU generator fills 16 values at a time)


class CVFPPhase1Settings(BaseModel):
    """The `[solver]` keys of the Phase-1 solver `name = "cvfp"`; defaults are the 11/28 v2 / `49da23b`
    values."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=0.002, gt=0, description="Adam step size (default betas, eps).")
    min_iterations: int = Field(default=5, ge=1, le=MAX_ITERATIONS,
                                description="Passes (iteration 0 included) before a stop.")
    max_iterations: int = Field(default=40, ge=1, le=MAX_ITERATIONS,
                                description="Most passes in total, iteration 0 included.")
    convergence_threshold: float = Field(
        default=0.03, ge=0, description="τ: a token has converged when mean_C (O^k − P^{k−1})² < τ.")
    min_converged_ratio: float = Field(
        default=0.95, ge=0, le=1, description="Stop once this share of tokens has converged.")
    context_noise: float = Field(
        default=0.1, ge=0, description="σ of the Gaussian noise added to the incoming contexts.")
    dist_reg_weight: float = Field(
        default=0.5, ge=0, le=1, description="w: loss = (1 − w)·cvfp + w·diversity.")
    batch_size: int = Field(
        default=8000, ge=1, le=MAX_BATCH,
        description="Phase-1 chunk: tokens per loss (the diversity term depends on it).")
    grad_clip: float = Field(default=1.0, gt=0, description="Global gradient-norm clip before each step.")
    init: Literal["rollout", "random"] = Field(
        default="rollout",
        description="Iteration 0: sequential noise-free rollout (every summary number) or N(0, 0.01²) "
                    "contexts (11/29, b1a2782).")
    loss_scope: Literal["chunk", "stream"] = Field(
        default="chunk",
        description="chunk: per-chunk loss, gradients accumulated (v1/v2); stream: one loss over the whole "
                    "stream (the 11/27 trainer, spec §3.4).")
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="stop: a NaN/Inf loss ends the run (RunFailed); skip: drop that chunk (the original).")
    solve: Literal["auto", "sequential", "jacobi", "chunked"] = Field(
        default="auto",
        description="Frozen rollouts (iteration 0 and the Phase-2 contexts); auto picks the fastest method "
                    "that meets solve_tolerance.")
    solve_tolerance: float = Field(
        default=1e-5, gt=0, description="Max |error| of a frozen solve against the sequential rollout.")

    @model_validator(mode="after")
    def _budget_holds_the_minimum(self) -> Self:
        """A minimum written above the budget can never be reached: the run would stop at max_iterations.
        Lowering only the budget is fine: the default minimum then ends where the budget does. The
        default written out (config.resolved.toml holds every value in force) is that same case, so
        a run directory's config loads again."""
        default = type(self).model_fields["min_iterations"].default
        if "min_iterations" in self.model_fields_set and self.min_iterations != default \
                and self.min_iterations > self.max_iterations:
            raise ValueError(f"min_iterations ({self.min_iterations}) is more than max_iterations "
                             f"({self.max_iterations}); raise max_iterations or lower min_iterations")
        return self


def stream_shard(n: int, settings: CVFPPhase1Settings, runner: Collectives) -> range:
    """This rank's rows of the stream, cut at chunk boundaries.

    Whole chunks per rank keep every chunk's loss (the diversity term depends on its rows) the
    same as in one process, so a sharded run takes the same optimiser steps. The stream scope has
    one global loss and is cut by position. Every rank must own rows: neighbour_exchange needs one.
    """
    if runner.world_size == 1:
        return range(n)
    if settings.loss_scope == "stream":
        rows = runner.shard(n)
    else:
        size = settings.batch_size
        chunks = runner.shard(-(-n // size))
        rows = range(min(chunks.start * size, n), min(chunks.stop * size, n))
    if len(rows) == 0:
        raise UserError(f"phase 1: {n} tokens in chunks of solver.batch_size = {settings.batch_size} leave rank "
                        f"{runner.rank} of {runner.world_size} without work; lower solver.batch_size to at "
                        f"most {max(n // runner.world_size, 1)} or start fewer processes")
    return rows


def _row_bytes(model: Any) -> int:
    """Rough fp32 bytes per token of one Phase-1 forward and backward (inputs, every layer's activations)."""
    widths = getattr(model, "layer_widths", (model.context_dim,))
    return 4 * (int(getattr(model, "token_width", 0)) + 2 * model.context_dim + 3 * sum(widths))


def phase1_oom(model: Any, contexts: torch.Tensor, batch: int, runner: Runner) -> str:
    """The one-line failure of a Phase-1 pass that ran out of memory and cannot be retried."""
    micro, rows = runner.micro_batch(batch), contexts.shape[0]
    held, chunk = rows * model.context_dim * 4, micro * _row_bytes(model)
    store = (' or runner.context_store = "host" to keep the contexts off the device'
             if contexts.device == runner.device and runner.device.type != "cpu" else "")
    return (f"phase 1: out of memory on {runner.device} (estimated {(held + chunk) / 2**30:.2f} GiB: "
            f"{held / 2**30:.2f} GiB of contexts for {rows:,} tokens on {contexts.device} and "
            f"{chunk / 2**30:.2f} GiB per {micro:,}-token chunk); set solver.batch_size = {max(micro // 2, 1)}, "
            f"or runner.auto_batch = true to split chunks automatically{store}")


def solve_oom(model: Any, positions: int, out: torch.Tensor | None, runner: Placement, what: str) -> str:
    """The one-line failure of a frozen solve (or Phase 1's iteration 0) that ran out of memory."""
    contexts = positions * model.context_dim * (4 if out is None else out.element_size())
    work = BLOCK * _row_bytes(model)
    if runner.device.type == "cpu":
        advice = ("Phase 1 keeps its contexts in RAM: use fewer tokens or more memory" if what.startswith("phase 1")
                  else 'set runner.context_store = "disk" to keep them in a memory-mapped file')
    elif out is None or out.device == runner.device:
        advice = 'set runner.context_store = "host" (or "disk") to keep them off the device'
    else:
        advice = "the contexts are off the device already: free device memory"
    return (f"{what}: out of memory on {runner.device} (estimated {(contexts + work) / 2**30:.2f} GiB: "
            f"{contexts / 2**30:.2f} GiB of contexts for {positions:,} positions and {work / 2**30:.2f} GiB "
            f"of working memory); {advice}")


def buffer_device(runner: Runner, rows: int, width: int) -> torch.device:
    """Where Phase 1's contexts live: `runner.context_store` decides as for the Phase-2 stores (auto:
    the device when they fit in memory_fraction of its free memory), in fp32 always; a disk store
    means host memory here. A pass then copies each chunk in and its outputs back."""
    kind, _, fraction = settings_of(runner)
    on_gpu = runner.device.type == "cuda"
    if kind == "auto":
        kind, _ = decide(rows * width * 4, fraction, free_bytes(runner.device) if on_gpu else None, None, on_gpu)
    return runner.device if kind == "device" else torch.device("cpu")


def initial_contexts(model: Any, ids: torch.Tensor, rows: range, settings: CVFPPhase1Settings, runner: Runner
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Iteration 0 for this rank's rows, in the one buffer the passes overwrite: the noise-free
    rollout P⁰ (a frozen solve) or N(0, 0.01²) contexts.

    Under ddp every rank does one process's whole work here (the rollout runs through the whole
    stream, the random draw covers every row) and keeps its rows, so all ranks reach the first
    collective together and the numbers are one process's."""
    started = time.perf_counter()
    n, width = ids.shape[0], model.context_dim
    device = buffer_device(runner, len(rows), width)
    pinned = device.type == "cpu" and runner.device.type == "cuda"
    contexts = torch.empty(len(rows), width, device=device, pin_memory=pinned)
    if settings.init == "random":  # the CPU generator's stream of one [n, C] draw (as in b1a2782), kept by rows
        for a in range(0, n, RANDOM_ROWS):
            b = min(a + RANDOM_ROWS, n)
            drawn = torch.randn(b - a, width).mul_(0.01)
            lo, hi = max(a, rows.start), min(b, rows.stop)
            if lo < hi:
                contexts[lo - rows.start:hi - rows.start] = drawn[lo - a:hi - a]
        return contexts, {"init": "random", "evaluations": 0, "seconds": time.perf_counter() - started}
    try:
        with torch.no_grad(), full_precision_matmuls(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained block rarely contracts: the fallback is the original
            result = solve_frozen(model, ids, settings.solve, settings.solve_tolerance, out=contexts,
                                  where=RowMap.of(n, rows))
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise RunFailed(solve_oom(model, len(rows), None, runner, "phase 1, iteration 0 (rollout)")) from error
    info = {"init": "rollout", "method": result.method, "gain": result.gain, "evaluations": result.token_evaluations,
            "contexts_on": str(device), "seconds": time.perf_counter() - started}
    return contexts, info


# Pass 1 compares the untrained block's outputs with iteration 0's rollout of that same block, which is
# its fixed point by construction: only the context noise (and position 0's wrap-around input) separate
# them, so its rate is high whatever the block learns. From pass 2 on, the previous pass was made by
# weights one Adam step older, and the rate measures how far training has settled.
ROLLOUT_RATE_NOTE = ("rate = share of tokens within convergence_threshold of the previous pass; at iteration 1 "
                     "that is iteration 0's rollout of the same untrained block, its fixed point, so only the "
                     "context noise separates them: a high first rate, then the trained block's own")


def consecutive_chunks(rows: int, settings: CVFPPhase1Settings) -> list[Rows]:
    """The loss groups of a pass over `rows` local rows: chunks of batch_size, or the whole stream."""
    if settings.loss_scope == "stream":
        return [range(rows)]
    return [range(a, min(a + settings.batch_size, rows)) for a in range(0, rows, settings.batch_size)]


def take_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, runner: Runner,
              settings: CVFPPhase1Settings, result: Sweep) -> None:
    """Sum gradients over ranks, clip, and step (unless a stream-scope loss was non-finite)."""
    sum_gradients(params, runner)
    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    if result.step:
        optimizer.step()


class PassSchedule:
    """What changes from pass to pass, for `cvfp`: nothing. Every local row in every pass, in the same
    consecutive loss groups, at the configured step size and noise. `gradual-decrease` overrides it."""

    def __init__(self, settings: CVFPPhase1Settings, rows: int, n: int, device: torch.device) -> None:
        self.settings, self.n = settings, n
        self.chunks = consecutive_chunks(rows, settings)
        self.flags: torch.Tensor | None = None  # per local row: converged in this pass (filled by the pass if set)

    def next_pass(self, k: int, optimizer: torch.optim.Optimizer) -> tuple[list[Rows], float]:
        """Pass k's loss groups and noise σ; a schedule that changes the step size sets it on `optimizer`."""
        return self.chunks, self.settings.context_noise

    def after_pass(self, k: int, result: Sweep) -> tuple[int, int]:
        """(tokens pass k evaluated, tokens that count as converged after it: the rate's numerator)."""
        return self.n, result.converged

    def history(self, result: Sweep) -> dict[str, float]:
        """Pass entries of the history beyond the losses, rate and seconds every schedule records."""
        return {}

    def shown(self, k: int, result: Sweep, rate: float, seconds: float) -> dict[str, float]:
        """Pass k's progress fields."""
        return {"iteration": k, "loss": result.loss, "cvfp_loss": result.cvfp_loss,
                "diversity_loss": result.diversity_loss, "rate": rate, "seconds": seconds}


class CVFPPhase1Solver:
    """Spec §3 Phase 1 (`fit`) and the frozen contexts of a stream (`solve`)."""

    def __init__(self, settings: CVFPPhase1Settings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPPhase1Settings()

    def schedule(self, rows: int, n: int, device: torch.device) -> PassSchedule:
        """What changes from pass to pass over `rows` local rows (of `n`) whose contexts live on `device`."""
        return PassSchedule(self.settings, rows, n, device)

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Iteration 0, then parallel passes with one Adam step each until the rate or the budget stops."""
        s, started = self.settings, time.perf_counter()
        n, seed = ids.shape[0], torch.initial_seed()  # the experiment seed: the noise derives from it
        rows = stream_shard(n, s, runner)
        params = model.param_groups()["phase1"]
        optimizer = torch.optim.Adam(params, lr=s.learning_rate)
        model.train()
        progress.start("phase1", s.max_iterations)
        contexts, first = initial_contexts(model, ids, rows, s, runner)
        progress.advance("phase1", iteration=0, seconds=first["seconds"])
        note = ROLLOUT_RATE_NOTE if first["init"] == "rollout" else None
        if note is not None:
            progress.message(f"phase1: {note}")
        evaluations, rate, iterations, history = first["evaluations"], 0.0, 1, []
        schedule = self.schedule(len(rows), n, contexts.device)
        for k in range(1, s.max_iterations):
            tick = time.perf_counter()
            chunks, sigma = schedule.next_pass(k, optimizer)
            optimizer.zero_grad(set_to_none=True)
            sweep = InPlacePass(model, ids, contexts, rows.start, chunks, s, runner, k, sigma, seed, params,
                                schedule.flags)
            result = with_oom_retry(runner, s.batch_size, sweep.run,
                                    lambda: phase1_oom(model, contexts, s.batch_size, runner), phase="phase1")
            take_step(params, optimizer, runner, s, result)
            evaluated, converged = schedule.after_pass(k, result)
            evaluations, iterations = evaluations + evaluated, k + 1
            rate = converged / n
            record = {"iteration": float(k), "loss": result.loss, "cvfp_loss": result.cvfp_loss,
                      "diversity_loss": result.diversity_loss, "convergence_rate": rate,
                      **schedule.history(result), "seconds": time.perf_counter() - tick}
            history.append(record)
            progress.advance("phase1", **schedule.shown(k, result, rate, record["seconds"]))
            if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
                break
        progress.finish("phase1")
        return Phase1Report(iterations, rate, n, evaluations, time.perf_counter() - started,
                            contexts, history, {"iteration0": first}, rows=rows,
                            target_rate=s.min_converged_ratio,
                            converged=iterations >= s.min_iterations and rate >= s.min_converged_ratio,
                            rate_note=note)

    def solve(self, model: Any, ids: torch.Tensor, runner: Runner, out: torch.Tensor | None = None, *,
              where: RowMap | None = None, progress: RolloutProgress | None = None) -> SolveResult:
        """The final-layer context of every position, position 0 from a zero context (spec §4.2).

        `out` ([where.rows, C], fp32 or bf16, any device) receives the rows `where` holds (default:
        all) block by block; without it they are a new fp32 tensor on the runner's device. `progress`
        resumes and checkpoints a sequential rollout.
        """
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), full_precision_matmuls():
                return solve_frozen(model, ids, self.settings.solve, self.settings.solve_tolerance, out, where,
                                    progress)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            raise RunFailed(solve_oom(model, ids.shape[0] if where is None else where.rows, out, runner,
                                      "frozen solve")) from error
        finally:
            model.train(training)


@hookimpl
def register_solvers(register: Any) -> None:
    register("cvfp", CVFPPhase1Solver, settings=CVFPPhase1Settings,
             description="CVFP Phase 1 (parallel fixed-point passes, one Adam step each) and frozen solves")
