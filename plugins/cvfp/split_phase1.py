"""Split-mode Phase 1 (spec §2.6): each context split trained on its own samples, then one merged solve.

A model with S independent context splits may offer `split_views()`: one model per split that
shares its weights. The reference trained split s, with its own Adam, own iteration 0 and own
wrap-around, on the samples whose index ≡ s (mod S), and then produced the training contexts with
one noise-free pass of the merged block over the whole stream. `SplitModeSolver` does exactly that
with any solver, so `fit` keeps the solver protocol and the rest of a unit does not change.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from newllm_kit.errors import DataError
from newllm_kit.protocols import Progress, Runner

from .contract import Phase1Report, Solver, SolveResult, accepts
from .row_map import RowMap


def split_ids(ids: torch.Tensor, boundaries: np.ndarray, split: int, splits: int) -> torch.Tensor:
    """The samples with index ≡ `split` (mod `splits`), concatenated in order, as one stream."""
    pieces = [ids[int(start):int(end)] for start, end in boundaries[split::splits]]
    return torch.cat(pieces) if pieces else ids[:0]


class SplitModeSolver:
    """`solver`, with `fit` run split by split when the model offers split views."""

    def __init__(self, solver: Solver, boundaries: np.ndarray) -> None:
        self.solver, self.boundaries = solver, boundaries
        self.splits: list[dict[str, Any]] = []  # per-split summaries of the last `fit`

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        views = model.split_views()
        started, reports = time.perf_counter(), []
        for index, view in enumerate(views):
            stream = split_ids(ids, self.boundaries, index, len(views))
            if stream.numel() < 2:
                raise DataError(f"phase 1: context split {index} of {len(views)} gets {stream.numel()} token(s) "
                                f"(samples ≡ {index} mod {len(views)}); train on more samples")
            reports.append(self.solver.fit(view, stream, runner, progress))
        self.splits = [{"tokens": r.tokens, "iterations": r.iterations, "convergence_rate": r.convergence_rate,
                        "converged": r.converged} for r in reports]
        n = int(ids.shape[0])  # the merged block, from a zero context, no noise; each ddp rank keeps its shard
        shard = runner.shard(n) if runner.world_size > 1 and accepts(self.solver.solve, "where") else None
        keywords: dict[str, Any] = {} if shard is None else {"where": RowMap.of(n, shard)}
        solved = self.solve(model, ids, runner, None, **keywords)
        tokens = sum(r.tokens for r in reports)
        stops = [r.converged for r in reports]
        return Phase1Report(
            iterations=max(r.iterations for r in reports),
            convergence_rate=sum(r.convergence_rate * r.tokens for r in reports) / tokens,
            tokens=int(ids.shape[0]),
            token_evaluations=sum(r.token_evaluations for r in reports) + solved.token_evaluations,
            seconds=time.perf_counter() - started,
            contexts=solved.layers[-1],
            extra={"splits": self.splits},
            target_rate=reports[0].target_rate,
            converged=None if None in stops else all(stops),
            rows=shard,
        )

    def solve(self, model: Any, ids: torch.Tensor, runner: Runner, out: torch.Tensor | None = None,
              **keywords: Any) -> SolveResult:
        """The wrapped solver's solve (with the recipe's `where`/`progress` where it takes them)."""
        return self.solver.solve(model, ids, runner, out, **keywords)


def phase1_solver(solver: Solver, model: Any, boundaries: np.ndarray) -> Solver:
    """The solver Phase 1 runs: split mode where the model has split views, else `solver` itself."""
    views = getattr(model, "split_views", None)
    return SplitModeSolver(solver, boundaries) if callable(views) and views() else solver
