"""What each registered factory must return: the contracts between the core and plugins.

These are structural (`typing.Protocol`): a plugin implements the methods and attributes, it
does not inherit from anything here. The result records (`Phase1Report`, `SolveResult`,
`EvalOutputs`) are concrete dataclasses shared by all plugins.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from typing_extensions import get_protocol_members


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


class Model(Protocol):
    """What an Architecture builds: the phases and solvers use only these members."""

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


class Architecture(Protocol):
    """Returned by an architecture factory; `build` makes a fresh, seeded-by-caller model."""

    def build(self, vocab_size: int) -> nn.Module: ...

    @property
    def embedding_dim(self) -> int: ...


@dataclass
class Phase1Report:
    """What a solver's `fit` returns: the stop decision and the training contexts."""

    iterations: int
    convergence_rate: float
    tokens: int
    token_evaluations: int
    seconds: float
    contexts: torch.Tensor  # [n, C] fp32 final contexts, whole stream on every rank (the Train ER; freed after)
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # The solver's own target, so a run can say "stopped at max_iterations, 11 % converged":
    target_rate: float | None = None  # the convergence rate the solver stops at
    converged: bool | None = None  # True: stopped on reaching target_rate; False: ran out of iterations


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


class Progress(Protocol):
    """Progress sink handed to long loops (rich bar on a TTY, plain lines otherwise)."""

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...


class Runner(Protocol):
    """Device placement, precision and (for distributed runners) the process group."""

    name: str
    device: torch.device
    precision: str
    rank: int
    world_size: int

    def setup(self) -> None: ...

    def autocast(self) -> AbstractContextManager[Any]: ...

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def micro_batch(self, batch: int) -> int:
        """Micro-batch in force for a requested batch (smaller after an out-of-memory fallback);
        callers accumulate gradients over ceil(batch / micro_batch) pieces so the step is unchanged."""
        ...

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        """Called after `torch.OutOfMemoryError`: True if the micro-batch was reduced (retry the
        step), False if the caller must fail (the runner raises a UserError with a suggestion)."""
        ...

    def shard(self, n: int) -> range:
        """The contiguous slice of an n-position stream this rank owns (all of it on one process)."""
        ...

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        """Send this shard's last row to the next rank; return the previous rank's last row
        (rank 0 gets the last rank's: the stream's wrap-around). One process: returns its input."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one process); returns the reduced tensor."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    def barrier(self) -> None: ...

    def teardown(self) -> None: ...


class Solver(Protocol):
    """A fixed-point solver: trains the ContextBlock (Phase 1) and evaluates it frozen.

    Both read a stream as its [n] token ids (int64 or int32, on runner.device), never as [n, T]
    token inputs: at scale no tensor of T or more floats per position may exist for the whole
    stream, so a solver computes the inputs of each chunk it works on with
    `newllm_kit.spans.token_span(model, ids, start, stop)`.
    """

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Train the ContextBlock (its "phase1" parameters) towards a fixed point over the stream."""
        ...

    def solve(self, model: Any, ids: torch.Tensor, runner: Runner, out: torch.Tensor | None = None) -> SolveResult:
        """The frozen block's final-layer context of every position, written into `out` ([n, C], fp32
        or bf16, any device: pinned host memory, a memory-mapped file) block by block when given,
        else into a new fp32 tensor on runner.device; returned as `layers[0]`."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TokenizerFactory(Protocol):
    """Loads (or trains, on training documents only) a tokenizer; `cache_dir` is per run."""

    def load(self, train_texts: Sequence[str], cache_dir: Path) -> Tokenizer: ...


class EmbeddingSource(Protocol):
    """Supplies the token-embedding table the head is tied to."""

    def load(self, vocab_size: int, dim: int, generator: torch.Generator) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


class DataSource(Protocol):
    """A corpus of documents (each a list of turns), addressed by stable row indices."""

    def size(self) -> int: ...

    def documents(self, rows: Sequence[int]) -> list[list[str]]: ...

    def fingerprint(self) -> str: ...


@dataclass
class EvalOutputs:
    """Everything a metric may read, accumulated exactly (float64 sums, integer counts)."""

    nll_sum: float = 0.0
    correct: int = 0
    count: int = 0
    contexts: torch.Tensor | None = None
    context_width: int = 0
    convergence_rate: float | None = None
    seed: int = 0


class Metric(Protocol):
    name: str
    direction: str
    unit: str

    def compute(self, outputs: EvalOutputs) -> float: ...


# What a factory registered for each kind must return (see `newllm_kit.hookspecs`).
PROTOCOLS: dict[str, type] = {
    "architecture": Architecture,
    "solver": Solver,
    "tokenizer": TokenizerFactory,
    "embedding": EmbeddingSource,
    "metric": Metric,
    "data_source": DataSource,
    "runner": Runner,
}


def missing_members(obj: object, protocol: type) -> list[str]:
    """Members of `protocol` that `obj` lacks, by name only: cheap enough to run before anything is
    trained, and it catches a factory that returns the wrong kind of object."""
    return sorted(name for name in get_protocol_members(protocol) if not hasattr(obj, name))


def missing_methods(cls: type, protocol: type) -> list[str]:
    """Methods of `protocol` that a class lacks: the check possible without an instance."""
    return sorted(name for name in get_protocol_members(protocol)
                  if callable(getattr(protocol, name, None)) and not callable(getattr(cls, name, None)))
