"""The Phase-1 solver `gradual-decrease`: CVFP Phase 1 whose work per pass shrinks as tokens converge.

Same objective, initialisation and stop rule as the Phase-1 solver `cvfp`, but a token whose
context has converged (mean_C (O^k − P^{k−1})² < τ) leaves the active set and keeps its context:
later passes evaluate, and put in the loss, only the tokens still moving. Step size and context
noise fall linearly ("arithmetically", 等差) over the pass budget, so late passes refine instead of
shake. This is a schedule of the training, not of the model: the `cvfp` architecture's variant
`gradual-reduction` (等差減少) is the other 等差, the context layers' widths shrinking layer by layer.
`cvfp`'s Phase-1 loop runs it with `ShrinkingSchedule`; frozen solves are `cvfp`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from newllm_kit import hookimpl

from .jacobi_pass import Rows, Sweep
from .phase1 import CVFPPhase1Settings, CVFPPhase1Solver, PassSchedule


class GradualDecreaseSettings(CVFPPhase1Settings):
    """`cvfp`'s keys plus where the linear learning-rate and noise schedules end."""

    lr_end_fraction: float = Field(
        default=0.1, gt=0, le=1,
        description="Learning rate at the last pass of the budget, as a fraction of learning_rate.")
    noise_end_fraction: float = Field(
        default=0.1, ge=0, le=1,
        description="Context noise at the last pass of the budget, as a fraction of context_noise.")


class ShrinkingSchedule(PassSchedule):
    """Passes over the still-active tokens, with linearly decreasing step size and noise.

    Converged tokens retire once min_iterations passes are done: after a rollout iteration 0, pass 1
    reports ≈100 % convergence (spec §3.3) and would otherwise retire every token untrained. Retired
    tokens count as converged in the rate. Chunks are batch_size consecutive active tokens; the noise
    is drawn per block of positions (`jacobi_pass.context_noise`), so a late pass over scattered
    active tokens still draws the blocks they fall in: at most one pass's worth, small next to the
    block's forward and backward.
    """

    settings: GradualDecreaseSettings

    def __init__(self, settings: GradualDecreaseSettings, rows: int, n: int, device: torch.device) -> None:
        super().__init__(settings, rows, n, device)
        self.active = torch.ones(rows, dtype=torch.bool, device=device)  # local rows still being solved
        self.converged = self.flags = torch.zeros_like(self.active)  # the pass marks its converged rows here
        self.retired = 0
        self.lr = self.sigma = 0.0

    def next_pass(self, k: int, optimizer: torch.optim.Optimizer) -> tuple[list[Rows], float]:
        s = self.settings
        fraction = (k - 1) / max(s.max_iterations - 2, 1)  # 0 at pass 1, 1 at the budget's last pass
        self.lr = s.learning_rate * (1 - fraction * (1 - s.lr_end_fraction))
        self.sigma = s.context_noise * (1 - fraction * (1 - s.noise_end_fraction))
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        remaining = self.active.nonzero().squeeze(1)
        chunks: list[Rows] = ([remaining] if s.loss_scope == "stream" else
                              [remaining[a:a + s.batch_size] for a in range(0, len(remaining), s.batch_size)])
        self.converged.zero_()
        return chunks, self.sigma

    def after_pass(self, k: int, result: Sweep) -> tuple[int, int]:
        counted = self.retired + result.converged
        if k + 1 >= self.settings.min_iterations:
            self.active &= ~self.converged  # NaN stays active
            self.retired += result.converged
        return result.tokens, counted

    def history(self, result: Sweep) -> dict[str, float]:
        return {"active_tokens": float(result.tokens), "learning_rate": self.lr, "context_noise": self.sigma}

    def shown(self, k: int, result: Sweep, rate: float, seconds: float) -> dict[str, float]:
        return {"iteration": k, "loss": result.loss, "rate": rate, "active": result.tokens, "seconds": seconds}


class GradualDecreaseSolver(CVFPPhase1Solver):
    """Phase 1 over a shrinking active set, with linearly decreasing step size and noise."""

    settings: GradualDecreaseSettings

    def __init__(self, settings: GradualDecreaseSettings | None = None) -> None:
        super().__init__(settings if settings is not None else GradualDecreaseSettings())

    def schedule(self, rows: int, n: int, device: torch.device) -> PassSchedule:
        return ShrinkingSchedule(self.settings, rows, n, device)


@hookimpl
def register_solvers(register: Any) -> None:
    register("gradual-decrease", GradualDecreaseSolver, settings=GradualDecreaseSettings,
             description="CVFP Phase 1 that retires converged tokens; step size and noise fall linearly")
