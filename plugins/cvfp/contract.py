"""The cvfp recipe's contracts: what a CVFP-shaped model and a fixed-point solver provide.

A third-party solver (`register_solvers`, TOML `[solver] name = …`) or a CVFP-shaped architecture
implements these; the core knows none of them. Structural, like `newllm_kit.protocols`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from newllm_kit.protocols import Progress, Runner


class ContextBlock(Protocol):
    """The recurrent block F(c, x) whose fixed point Phase 1 trains.

    `project_tokens` computes the token half of every layer input once per stream, so solvers
    that sweep a stream many times never redo it; `step` is F with that work already done.
    """

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, T] token inputs -> [n, P] precomputed token contributions (opaque to callers)."""
        ...

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        """[b, C] incoming contexts and [b, P] projected tokens -> every layer's output [b, d_j]."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class CVFPModel(Protocol):
    """What the cvfp recipe needs of a model, beyond `newllm_kit.protocols.LanguageModel`: the phases
    and solvers use only these members."""

    context_block: Any
    token_block: Any
    context_dim: int
    layer_widths: tuple[int, ...]
    token_width: int
    embedding_dim: int
    vocab_size: int

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] token ids of one stream -> [n, T] normalised (N-token) inputs, zeros before its start."""
        ...

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Per-layer contexts [b, d_j] and token inputs [b, T] -> final token states [b, E]."""
        ...

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, E], bias [V] or None): logits = states @ weight.T + bias, computed in chunks."""
        ...

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters trained by each phase: keys "phase1" and "phase2"."""
        ...

    def param_counts(self) -> dict[str, int]:
        """context_block, token_block, embedding (table + its norm), head (0 when tied), total."""
        ...


@dataclass
class Phase1Report:
    """What a solver's `fit` returns: the stop decision and the training contexts."""

    iterations: int
    convergence_rate: float
    tokens: int
    token_evaluations: int
    seconds: float
    contexts: torch.Tensor  # fp32 final contexts of the rows `rows` (the Train ER, the fast path; freed after)
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # The solver's own target, so a run can say "stopped at max_iterations, 11 % converged":
    target_rate: float | None = None  # the convergence rate the solver stops at
    converged: bool | None = None  # True: stopped on reaching target_rate; False: ran out of iterations
    # Where a pass's rate measures something else than later ones (recorded, drawn under the rate):
    rate_note: str | None = None
    # The stream rows `contexts` holds: this rank's shard under ddp; None: the whole stream (every rank)
    rows: range | None = None


@dataclass
class SolveResult:
    """Contexts of a frozen ContextBlock for a whole stream: one per position.

    `layers == [contexts]`: contexts[i] = c_i = h_L(i), the final layer's output at position i
    from c_{i−1} (c_{−1} = 0), as a sequential rollout gives it. The per-layer contexts of any
    positions are one batched `step(c_{i−1}, project_tokens(x_i))`, recomputed where needed.
    """

    layers: list[torch.Tensor]
    method: str
    iterations: int
    token_evaluations: int
    seconds: float
    max_change: float | None = None
    gain: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    """A fixed-point solver: trains the ContextBlock (Phase 1) and evaluates it frozen.

    Both read a stream as its [n] token ids (int64 or int32, on runner.device), never as [n, T]
    token inputs: at scale no tensor of T or more floats per position may exist for the whole
    stream, so a solver computes the inputs of each chunk it works on with
    `newllm_kit_plugins.cvfp.spans.token_span(model, ids, start, stop)`.
    """

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Train the ContextBlock (its "phase1" parameters) towards a fixed point over the stream."""
        ...

    def solve(self, model: Any, ids: torch.Tensor, runner: Runner, out: torch.Tensor | None = None) -> SolveResult:
        """The frozen block's final-layer context of every position, written into `out` ([n, C], fp32
        or bf16, any device: pinned host memory, a memory-mapped file) block by block when given,
        else into a new fp32 tensor on runner.device; returned as `layers[0]`.

        A solver may also take two keywords, which the cvfp recipe passes where `solve` names them:
        `where` (a `row_map.RowMap`: only those rows go into `out`, in that order, so that each ddp
        rank stores only the rows it reads) and `progress` (a `frozen_solve.RolloutProgress`: a long
        sequential rollout resumes from its last checkpoint and reports each block). Without them
        every rank stores whole streams and a killed solve starts over."""
        ...


def accepts(function: Any, keyword: str) -> bool:
    """Whether a solver's method takes `keyword` (the optional keywords of `Solver.solve`)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
