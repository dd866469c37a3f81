"""Built-in evaluation metrics (spec §5): perplexity, accuracy, effective rank, convergence rate.

Every metric reads only `EvalOutputs`, whose sums are exact (float64 NLL, integer counts), so a
metric is a pure function of what the evaluation accumulated.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.protocols import EvalOutputs


def rank_rows(n: int, max_rows: int = 10_000, seed: int = 0) -> torch.Tensor:
    """The rows `effective_rank` reads of an n-row matrix, in the order it reads them: all of them up
    to `max_rows`, else a seeded random subset (so a recipe holding a stream in shards can gather just
    these rows and get the same number)."""
    if n <= max_rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]


def effective_rank(matrix: torch.Tensor, max_rows: int = 10_000, seed: int = 0) -> float:
    """exp(entropy) of the normalised singular values of the uncentred [n, C] matrix (spec §5).

    Above `max_rows` rows a random subset is used, drawn from a generator seeded with `seed` (the
    original used the global RNG, so its number depended on everything run before it). Rows holding
    NaN or inf have no singular values: the rank is NaN ("—" in the table), as for a missing extra,
    since a metric sees no unit to fail; the run itself refuses such outputs (non-finite NLL).
    """
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise ValueError(f"effective rank needs a non-empty [rows, width] matrix; got {tuple(matrix.shape)}")
    rows = matrix.detach()
    if rows.shape[0] > max_rows:
        rows = rows[rank_rows(rows.shape[0], max_rows, seed).to(rows.device)]
    rows = rows.to("cpu", torch.float64)
    if not bool(torch.isfinite(rows).all()):
        return math.nan
    s = torch.linalg.svdvals(rows)
    if s.sum() == 0:
        return 0.0  # the zero matrix spans nothing
    p = s / s.sum()
    return math.exp(float(-(p * torch.log(p + 1e-10)).sum()))


class Perplexity:
    """exp(mean NLL) over all predicted positions."""

    name, direction, unit = "ppl", "min", "perplexity"

    def __init__(self, settings: None = None) -> None:
        pass

    def compute(self, outputs: EvalOutputs) -> float:
        if outputs.count == 0:
            return math.nan
        mean = outputs.nll_sum / outputs.count
        return math.exp(mean) if mean < 700 else math.inf


class Accuracy:
    """Share of positions whose argmax logit is the next token."""

    name, direction, unit = "accuracy", "max", "fraction"

    def __init__(self, settings: None = None) -> None:
        pass

    def compute(self, outputs: EvalOutputs) -> float:
        return outputs.correct / outputs.count if outputs.count else math.nan


class EffectiveRankSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_rows: int = Field(default=10_000, ge=1, le=10**9, description="Rows sampled (seeded) before the SVD.")


class EffectiveRank:
    """Effective rank of the evaluated contexts (extras "contexts", "context_width") as a fraction of the
    width: the "ER %" column. For the lm recipe's models, their final hidden states."""

    name, direction, unit = "effective_rank", "max", "fraction of width"

    def __init__(self, settings: EffectiveRankSettings | None = None) -> None:
        self.settings = settings if settings is not None else EffectiveRankSettings()

    def compute(self, outputs: EvalOutputs) -> float:
        contexts = outputs.extras.get("contexts")
        if not isinstance(contexts, torch.Tensor) or contexts.numel() == 0:
            return math.nan
        width = int(outputs.extras.get("context_width") or contexts.shape[-1])
        return effective_rank(contexts, self.settings.max_rows, outputs.seed) / width


class ConvergenceRate:
    """Phase 1's final convergence rate (spec §3.3; extras "convergence_rate"), passed through for the
    results table; NaN for recipes without a fixed point."""

    name, direction, unit = "convergence_rate", "max", "fraction of tokens"

    def __init__(self, settings: None = None) -> None:
        pass

    def compute(self, outputs: EvalOutputs) -> float:
        rate = outputs.extras.get("convergence_rate")
        return math.nan if rate is None else float(rate)


@hookimpl
def register_metrics(register: Any) -> None:
    register("ppl", Perplexity, description="Perplexity: exp of the mean next-token NLL")
    register("accuracy", Accuracy, description="Top-1 next-token accuracy")
    register("effective_rank", EffectiveRank, settings=EffectiveRankSettings,
             description="Effective rank of the contexts (exp entropy of singular values) / width")
    register("convergence_rate", ConvergenceRate, description="Phase-1 share of converged tokens")
