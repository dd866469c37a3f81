"""The `gradual-decrease` solver: CVFP Phase 1 whose work per pass shrinks as tokens converge.

Same objective, initialisation and stop rule as `cvfp`, but a token whose context has converged
(mean_C (O^k − P^{k−1})² < τ) leaves the active set and keeps its context: later passes
evaluate, and put in the loss, only the tokens still moving. Step size and context noise fall
linearly ("arithmetically", 等差) over the pass budget, so late passes refine instead of shake.
Frozen solves are the `cvfp` ones.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from newllm_kit import hookimpl
from newllm_kit.protocols import Progress, Runner

from .contract import Phase1Report
from .jacobi_pass import InPlacePass, Rows, with_oom_retry
from .phase1 import (
    CVFPSolver,
    CVFPSolverSettings,
    gather_rows,
    initial_contexts,
    phase1_oom,
    stream_shard,
    take_step,
)


class GradualDecreaseSettings(CVFPSolverSettings):
    """`cvfp`'s keys plus where the linear learning-rate and noise schedules end."""

    lr_end_fraction: float = Field(
        default=0.1, gt=0, le=1,
        description="Learning rate at the last pass of the budget, as a fraction of learning_rate.")
    noise_end_fraction: float = Field(
        default=0.1, ge=0, le=1,
        description="Context noise at the last pass of the budget, as a fraction of context_noise.")


class GradualDecreaseSolver(CVFPSolver):
    """Phase 1 over a shrinking active set, with linearly decreasing step size and noise."""

    settings: GradualDecreaseSettings

    def __init__(self, settings: GradualDecreaseSettings | None = None) -> None:
        super().__init__(settings if settings is not None else GradualDecreaseSettings())

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Like `CVFPSolver.fit`; converged tokens retire once min_iterations passes are done.

        Retirement waits for min_iterations because, after a rollout iteration 0, pass 1 reports
        ≈100 % convergence (spec §3.3) and would otherwise retire every token untrained. Retired
        tokens count as converged in the rate. Chunks are batch_size consecutive active tokens;
        the noise is drawn per block of positions (`context_noise`), so a late pass over scattered
        active tokens still draws the blocks they fall in: at most one pass's worth, small next to
        the block's forward and backward.
        """
        s, started = self.settings, time.perf_counter()
        n, seed = ids.shape[0], torch.initial_seed()
        rows = stream_shard(n, s, runner)
        params = model.param_groups()["phase1"]
        optimizer = torch.optim.Adam(params, lr=s.learning_rate)
        model.train()
        progress.start("phase1", s.max_iterations)
        contexts, first = initial_contexts(model, ids, rows, s, runner)
        progress.advance("phase1", iteration=0, seconds=first["seconds"])
        evaluations, rate, iterations, history = first["evaluations"], 0.0, 1, []
        active = torch.ones(len(rows), dtype=torch.bool, device=contexts.device)  # local rows still being solved
        converged = torch.zeros_like(active)
        retired = 0
        for k in range(1, s.max_iterations):
            tick = time.perf_counter()
            fraction = (k - 1) / max(s.max_iterations - 2, 1)  # 0 at pass 1, 1 at the budget's last pass
            lr = s.learning_rate * (1 - fraction * (1 - s.lr_end_fraction))
            sigma = s.context_noise * (1 - fraction * (1 - s.noise_end_fraction))
            for group in optimizer.param_groups:
                group["lr"] = lr
            remaining = active.nonzero().squeeze(1)
            chunks: list[Rows] = ([remaining] if s.loss_scope == "stream" else
                                  [remaining[a:a + s.batch_size] for a in range(0, len(remaining), s.batch_size)])
            optimizer.zero_grad(set_to_none=True)
            converged.zero_()
            sweep = InPlacePass(model, ids, contexts, rows.start, chunks, s, runner, k, sigma, seed, params,
                                converged)
            result = with_oom_retry(runner, s.batch_size, sweep.run,
                                    lambda: phase1_oom(model, contexts, s.batch_size, runner))
            take_step(params, optimizer, runner, s, result)
            evaluations, iterations = evaluations + result.tokens, k + 1
            rate = (retired + result.converged) / n
            if k + 1 >= s.min_iterations:
                active &= ~converged  # NaN stays active
                retired += result.converged
            record = {"iteration": float(k), "loss": result.loss, "cvfp_loss": result.cvfp_loss,
                      "diversity_loss": result.diversity_loss, "convergence_rate": rate,
                      "active_tokens": float(result.tokens), "learning_rate": lr, "context_noise": sigma,
                      "seconds": time.perf_counter() - tick}
            history.append(record)
            progress.advance("phase1", iteration=k, loss=result.loss, rate=rate, active=result.tokens,
                             seconds=record["seconds"])
            if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
                break
        progress.finish("phase1")
        return Phase1Report(iterations, rate, n, evaluations, time.perf_counter() - started,
                            gather_rows(contexts, rows, n, runner), history, {"iteration0": first},
                            target_rate=s.min_converged_ratio,
                            converged=iterations >= s.min_iterations and rate >= s.min_converged_ratio)


@hookimpl
def register_solvers(register: Any) -> None:
    register("gradual-decrease", GradualDecreaseSolver, settings=GradualDecreaseSettings,
             description="CVFP Phase 1 that retires converged tokens; step size and noise fall linearly")
