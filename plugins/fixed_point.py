"""The `cvfp` solver: Phase-1 fixed-point training of the ContextBlock (spec §3) and frozen solves.

Phase 1 alternates one parallel ("Jacobi") pass over the whole stream with one Adam step: every
token's incoming context is the previous pass's output of the token before it (wrap-around at
position 0), plus noise, and the loss pulls each output towards the previous pass's output at
the same position while a diversity term keeps the contexts apart. The frozen solves (the
contexts Phase 2 reads) live in `frozen_solve`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.errors import RunFailed, UserError
from newllm_kit.protocols import Phase1Report, Progress, Runner, SolveResult

from .frozen_solve import full_precision_matmuls, solve_frozen

T = TypeVar("T")
MAX_ITERATIONS = 1_000_000  # each pass sweeps the whole stream: far beyond any real budget
MAX_BATCH = 10**9


class CVFPSolverSettings(BaseModel):
    """The `[solver]` keys of `name = "cvfp"`; defaults are the 11/28 v2 / `49da23b` values."""

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


@dataclass
class Sweep:
    """One parallel pass: detached outputs, per-token change, and sums over all ranks."""

    outputs: torch.Tensor
    change: torch.Tensor
    loss: float
    cvfp_loss: float
    diversity_loss: float
    converged: int
    tokens: int
    step: bool  # stream scope takes no step after a non-finite loss (spec §3.4)


def with_oom_retry(runner: Runner, batch: int, optimizer: torch.optim.Optimizer, work: Callable[[], T]) -> T:
    """Redo `work` with the runner's smaller micro-batch after an out-of-memory error.

    `work` contains collectives, so under ddp every rank must retry together: `oom_on_any_rank`
    turns one rank's OOM into an OOM on all of them at the same point of the sweep."""
    while True:
        try:
            return work()
        except torch.OutOfMemoryError as error:
            optimizer.zero_grad(set_to_none=True)
            if not runner.handle_oom(error, batch):
                raise


def oom_on_any_rank(runner: Runner, compute: Callable[[], T]) -> T:
    """Run collective-free `compute` on every rank; if any rank ran out of memory, all raise it here.

    A rank that retried on its own would re-enter the sweep's collectives out of step with the
    others (mismatched all-reduces, or a hang until runner.timeout_s). Agreeing at this point,
    before the next collective, lets every rank shrink its micro-batch and redo the sweep in step."""
    failure: torch.OutOfMemoryError | None = None
    result: T | None = None
    try:
        result = compute()
    except torch.OutOfMemoryError as error:
        failure = error
    if runner.world_size > 1:
        flag = torch.tensor([0.0 if failure is None else 1.0], device=runner.device)
        if runner.all_reduce_sum(flag).item() > 0 and failure is None:
            failure = torch.OutOfMemoryError(f"out of memory on another rank (retrying together on rank "
                                             f"{runner.rank})")
    if failure is not None:
        raise failure
    return cast(T, result)


def shifted(previous: torch.Tensor, runner: Runner) -> torch.Tensor:
    """ĉ_i = P_{i−1}; position 0 gets the stream's last context (wrap-around) via the previous rank."""
    return torch.cat([runner.neighbour_exchange(previous[-1:]), previous[:-1]])


def noise(n: int, rows: range, width: int, sigma: float, device: torch.device) -> torch.Tensor | float:
    """N(0, σ²) drawn for the whole stream from the global RNG, so every sharding sees the same noise."""
    return torch.randn(n, width, device=device)[rows.start:rows.stop] * sigma if sigma > 0 else 0.0


def sweep(block: Any, tokens: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
          settings: CVFPSolverSettings, runner: Runner, iteration: int) -> Sweep:
    """Outputs for the given rows, with each chunk's loss back-propagated (no optimiser step).

    Chunk losses are scaled by 1/(chunks over all ranks), so summing gradients over ranks gives
    the unweighted mean of chunk gradients of spec §3.2. A chunk that exceeds the runner's
    micro-batch, and the stream scope, use `_backward_in_pieces`.
    """
    m, width, w = tokens.shape[0], targets.shape[1], settings.dist_reg_weight
    device = targets.device
    stream = settings.loss_scope == "stream"
    size = settings.batch_size
    bounds = [(0, m)] if stream else [(a, min(a + size, m)) for a in range(0, m, size)]
    count = torch.tensor([float(len(bounds))], device=device)
    chunks = 1.0 if stream else runner.all_reduce_sum(count).item()
    micro = runner.micro_batch(settings.batch_size)
    outputs, change = targets.new_empty(m, width), targets.new_empty(m)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # token-weighted losses, bad chunks, converged

    def chunk_loop() -> int | None:
        """Every chunk's forward and backward; the index of the first non-finite chunk."""
        first_bad = None
        for j, (a, b) in enumerate(bounds):
            x, c, target = tokens[a:b], inputs[a:b], targets[a:b]
            if not stream and b - a <= micro:
                with runner.autocast():
                    out = block.step(c, block.project_tokens(x))[-1].float()
                per_token = (out - target).pow(2).mean(1)
                cvfp, diversity = per_token.mean(), -(out - out.mean(0)).norm() / (b - a)
                loss = (1 - w) * cvfp + w * diversity
                if torch.isfinite(loss):
                    (loss / chunks).backward()
            else:
                out, per_token, cvfp, diversity, loss = _backward_in_pieces(block, x, c, target, w, micro,
                                                                            runner, stream, chunks)
            outputs[a:b], change[a:b] = out.detach(), per_token.detach()
            finite = bool(torch.isfinite(loss))
            first_bad = j if first_bad is None and not finite else first_bad
            weight = b - a
            converged = (change[a:b] < settings.convergence_threshold).sum()
            parts = [loss * weight, cvfp * weight, diversity * weight, torch.tensor(float(not finite)), converged]
            sums.add_(torch.stack([t.detach().double().to(device) for t in parts]))
        return first_bad

    # The stream scope has collectives inside `_backward_in_pieces`, which agrees on OOMs itself.
    first_bad = chunk_loop() if stream else oom_on_any_rank(runner, chunk_loop)
    sums = runner.all_reduce_sum(sums)
    n = runner.all_reduce_sum(torch.tensor([float(m)], device=device)).item()
    if sums[3] > 0 and settings.nonfinite == "stop":
        where = f"chunk {first_bad}" if first_bad is not None else "a chunk on another rank"
        if runner.world_size > 1 and first_bad is not None:
            where += f" of rank {runner.rank}"
        raise RunFailed(f"phase 1: non-finite loss at iteration {iteration}, {where}; lower "
                        f"solver.learning_rate, or set solver.nonfinite = \"skip\" to drop such chunks "
                        f"as the original did")
    loss, cvfp, diversity = (sums[:3] / max(n, 1)).tolist()
    return Sweep(outputs, change, loss, cvfp, diversity, int(sums[4]), int(n), not (stream and sums[3] > 0))


def _backward_in_pieces(block: Any, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor, w: float,
                        micro: int, runner: Runner, stream: bool,
                        chunks: float) -> tuple[torch.Tensor, ...]:
    """The same loss and gradient as one piece, computed in micro-batches (or over all ranks).

    The diversity term couples rows only through the group mean μ and norm N = ‖O − μ‖_F, and
    its gradient for row i is −(O_i − μ)/(N·m). So a no-grad pass gets O, μ and N, and each
    piece then back-propagates a surrogate with exactly that gradient. Costs one extra forward.
    """
    m, width = x.shape[0], target.shape[1]
    # Only the stream scope has collectives here; the chunk scope's caller agrees on OOMs around it.
    guard: Callable[[Callable[[], Any]], Any] = (lambda f: oom_on_any_rank(runner, f)) if stream else (lambda f: f())

    def forward() -> torch.Tensor:
        pieces = []
        for a in range(0, m, micro):
            with runner.autocast():
                pieces.append(block.step(c[a:a + micro], block.project_tokens(x[a:a + micro]))[-1].float())
        return torch.cat(pieces) if pieces else target.new_zeros(0, width)

    with torch.no_grad():
        out = guard(forward)
        per_token = (out - target).pow(2).mean(1)
        reduce = runner.all_reduce_sum if stream else (lambda t: t)
        count = reduce(torch.tensor([float(m)], device=out.device)).item()
        mean = reduce(out.sum(0)) / count
        spread = reduce((out - mean).pow(2).sum().reshape(1)).sqrt()
        cvfp = reduce(per_token.sum().reshape(1)) / count
        diversity = -spread / count
        loss = ((1 - w) * cvfp + w * diversity).squeeze(0)

    def backward() -> None:
        for a in range(0, m, micro):
            with runner.autocast():
                o = block.step(c[a:a + micro], block.project_tokens(x[a:a + micro]))[-1].float()
            surrogate = ((1 - w) * (o - target[a:a + micro]).pow(2).sum() / (count * width)
                         - w * (o * (out[a:a + micro] - mean)).sum() / (spread.squeeze(0) * count))
            (surrogate / chunks).backward()

    if torch.isfinite(loss):
        guard(backward)
    return out, per_token, cvfp.squeeze(0), diversity.squeeze(0), loss


def stream_shard(n: int, settings: CVFPSolverSettings, runner: Runner) -> range:
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


def gather_rows(local: torch.Tensor, rows: range, n: int, runner: Runner) -> torch.Tensor:
    """The whole stream's rows on every rank (a sum of zero-padded shards: exact, one collective)."""
    if runner.world_size == 1:
        return local
    full = local.new_zeros(n, *local.shape[1:])
    full[rows.start:rows.stop] = local
    return runner.all_reduce_sum(full)


def reduce_gradients(params: list[torch.nn.Parameter], runner: Runner) -> None:
    """Sum gradients over ranks in one collective (losses are already scaled to a global mean)."""
    if runner.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = runner.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p)


def initial_contexts(model: Any, tokens: torch.Tensor, rows: range, settings: CVFPSolverSettings
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Iteration 0: the noise-free rollout P⁰ (via the frozen solve) or N(0, 0.01²) contexts."""
    started = time.perf_counter()
    if settings.init == "random":  # drawn on the CPU generator, as in b1a2782
        contexts = (torch.randn(tokens.shape[0], model.context_dim) * 0.01).to(tokens.device)
        return contexts[rows.start:rows.stop], {"init": "random", "evaluations": 0,
                                                "seconds": time.perf_counter() - started}
    block = model.context_block
    with torch.no_grad(), full_precision_matmuls(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained block rarely contracts: the fallback is the original
        # The whole stream on every rank, not just up to this shard: a rank's share of the rollout
        # would be as slow as the rollout (it is sequential), and the same solve everywhere gives
        # every rank exactly the single-process iteration 0.
        result = solve_frozen(block, block.project_tokens(tokens), model.context_dim,
                              settings.solve, settings.solve_tolerance, keep_all=False)
    info = {"init": "rollout", "method": result.method, "gain": result.gain,
            "evaluations": result.token_evaluations, "seconds": time.perf_counter() - started}
    return result.layers[-1][rows.start:rows.stop], info


class CVFPSolver:
    """Spec §3 Phase 1 (`fit`) and the frozen per-layer contexts of a stream (`solve`)."""

    def __init__(self, settings: CVFPSolverSettings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPSolverSettings()

    def fit(self, model: Any, tokens: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Iteration 0, then parallel passes with one Adam step each until the rate or the budget stops."""
        s, started = self.settings, time.perf_counter()
        n = tokens.shape[0]
        rows = stream_shard(n, s, runner)
        local = tokens[rows.start:rows.stop]
        params = model.param_groups()["phase1"]
        optimizer = torch.optim.Adam(params, lr=s.learning_rate)
        model.train()
        progress.start("phase1", s.max_iterations)
        previous, first = initial_contexts(model, tokens, rows, s)
        progress.advance("phase1", iteration=0, seconds=first["seconds"])
        evaluations, rate, iterations, history = first["evaluations"], 0.0, 1, []
        for k in range(1, s.max_iterations):
            tick = time.perf_counter()
            width = previous.shape[1]
            inputs = shifted(previous, runner) + noise(n, rows, width, s.context_noise, local.device)

            def work(inputs: torch.Tensor = inputs, targets: torch.Tensor = previous, k: int = k) -> Sweep:
                optimizer.zero_grad(set_to_none=True)
                return sweep(model.context_block, local, inputs, targets, s, runner, k)

            result = with_oom_retry(runner, s.batch_size, optimizer, work)
            reduce_gradients(params, runner)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            if result.step:
                optimizer.step()
            previous, evaluations, iterations = result.outputs, evaluations + n, k + 1
            rate = result.converged / n
            record = {"iteration": float(k), "loss": result.loss, "cvfp_loss": result.cvfp_loss,
                      "diversity_loss": result.diversity_loss, "convergence_rate": rate,
                      "seconds": time.perf_counter() - tick}
            history.append(record)
            progress.advance("phase1", iteration=k, loss=result.loss, cvfp_loss=result.cvfp_loss,
                             diversity_loss=result.diversity_loss, rate=rate, seconds=record["seconds"])
            if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
                break
        progress.finish("phase1")
        return Phase1Report(iterations, rate, n, evaluations, time.perf_counter() - started,
                            gather_rows(previous, rows, n, runner), history, {"iteration0": first},
                            target_rate=s.min_converged_ratio,
                            converged=iterations >= s.min_iterations and rate >= s.min_converged_ratio)

    def solve(self, model: Any, tokens: torch.Tensor, runner: Runner) -> SolveResult:
        """Every layer's output at every position, position 0 from a zero context (spec §4.2)."""
        block, training = model.context_block, model.training
        model.eval()
        try:
            with torch.no_grad(), full_precision_matmuls():
                return solve_frozen(block, block.project_tokens(tokens), model.context_dim,
                                    self.settings.solve, self.settings.solve_tolerance)
        finally:
            model.train(training)


@hookimpl
def register_solvers(register: Any) -> None:
    register("cvfp", CVFPSolver, settings=CVFPSolverSettings,
             description="CVFP Phase 1 (parallel fixed-point passes, one Adam step each) and frozen solves")
