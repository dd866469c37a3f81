"""What each registered factory must return: the contracts between the core and plugins.

These are structural (`typing.Protocol`): a plugin implements the methods and attributes, it
does not inherit from anything here. The records passed between them (`EvalOutputs`, `UnitData`,
`UnitContext`, `RecipeResult`, `Saved`) are concrete dataclasses shared by all plugins. A kind a
recipe adds (the cvfp recipe's solvers) keeps its contract beside that recipe.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from typing_extensions import get_protocol_members


class LanguageModel(Protocol):
    """What every architecture builds (an `nn.Module`); each recipe adds the members it needs
    (see the recipe's contract: `newllm_kit_plugins.lm.AutoregressiveModel`,
    `newllm_kit_plugins.cvfp.contract.CVFPModel`)."""

    vocab_size: int
    embedding_dim: int

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        """Install the [V, E] token-embedding table (the tied head reads it); `freeze` keeps it fixed.
        An unfrozen table must then be in one of `param_groups()`, or no recipe trains it."""
        ...

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, E], bias [V] or None): logits = states @ weight.T + bias, computed in chunks."""
        ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters each stage of the recipe trains, by the recipe's group names ("train" for the
        lm recipe, "phase1" and "phase2" for cvfp). Every parameter that requires a gradient must be in
        a group: the core refuses a model that leaves one out (it would stay untrained)."""
        ...

    def param_counts(self) -> dict[str, int]:
        """Parameter counts of the model's parts, by name, in display order; must include "total"."""
        ...


class Architecture(Protocol):
    """Returned by an architecture factory. `build` makes a fresh `LanguageModel` (an `nn.Module` with
    the members its recipe needs too); the core seeds torch before calling it, then installs the
    embedding table of width `embedding_dim` with `set_embedding`."""

    default_recipe: str  # the recipe that trains this architecture unless [[models]] recipe = … says otherwise

    def build(self, vocab_size: int) -> nn.Module: ...

    @property
    def embedding_dim(self) -> int: ...


class Progress(Protocol):
    """Progress sink handed to long loops (rich bar on a TTY, plain lines otherwise)."""

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None:
        """One line for the user, above a progress bar or as a log line."""
        ...


@runtime_checkable
class Placement(Protocol):
    """Where a unit runs and in what precision: the device models and streams are moved to, the
    autocast context of forward passes, and what is set up around the run (threads, a process group)."""

    name: str
    device: torch.device
    precision: str

    def setup(self) -> None: ...

    def autocast(self) -> AbstractContextManager[Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def teardown(self) -> None: ...


@runtime_checkable
class MemoryPolicy(Protocol):
    """How much work fits in memory: automatic batch sizes, the out-of-memory fallback, and where a
    recipe keeps its large per-position state (the cvfp recipe's context stores).

    The store members have defaults, declared here: a runner may leave them out, and readers
    then take these values (`member(runner, MemoryPolicy, name)`)."""

    context_store: str = "auto"  # "device", "host", "disk", or "auto": device, else host, else disk, by free memory
    context_dtype: str = "fp32"  # "fp32" or "bf16": the dtype of those stores
    memory_fraction: float = 0.5  # the share of free memory an automatic store may fill
    local_world_size: int = 1  # processes of the job on this host, which share its RAM and disk

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int: ...

    def micro_batch(self, batch: int) -> int:
        """Micro-batch in force for a requested batch (smaller after an out-of-memory fallback);
        callers accumulate gradients over ceil(batch / micro_batch) pieces so the step is unchanged."""
        ...

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        """Called after `torch.OutOfMemoryError`: True if the micro-batch was reduced (retry the
        step), False if the caller must fail (the runner raises a UserError with a suggestion)."""
        ...


@runtime_checkable
class Collectives(Protocol):
    """The process group (one process: identities). `device` is where the tensors it reduces must live
    (NCCL reduces CUDA tensors only), so it is here too: a caller builds those tensors."""

    rank: int
    world_size: int
    device: torch.device

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


@runtime_checkable
class Runner(Placement, MemoryPolicy, Collectives, Protocol):
    """What a runner factory returns and a recipe is handed (`UnitContext.runner`): all three concerns.
    A function that needs one of them takes that protocol instead."""


@runtime_checkable
class Tokenizer(Protocol):
    """Ids 0 … vocab_size − 1 for text and back; `fingerprint` identifies the vocabulary and rules
    (what was trained, on what), so a cached token stream is never read with another tokenizer.
    Optional `serialise() -> str`: the tokenizer as `tokenizers` JSON whose sha256 is `fingerprint`,
    which a kept model carries (`newllm_kit.kept_models`); without it, a kept model's tokenizer is
    rebuilt from its settings and must give the same fingerprint."""

    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TokenizerFactory(Protocol):
    """Loads (or trains, on training documents only) a tokenizer. `cache_dir` is shared by the runs
    of one experiment (`<out>/<experiment>/.cache`): name what you keep there by what it was made from.
    Optional attribute `expected_vocab_size: int`, the vocabulary size known before loading: what
    `newllm-kit params` needs, and what the models are test-built with when a file loads (else 256).
    Optional `check()`: raise the DataError loading would raise, where finding out is cheap and downloads
    nothing (a missing local path, a hub file while offline); `run` and `validate` call it before any
    data is read (`newllm_kit.preflight`)."""

    def load(self, train_texts: Sequence[str], cache_dir: Path) -> Tokenizer: ...


class EmbeddingSource(Protocol):
    """Supplies the token-embedding table the head is tied to: `load` returns a float [vocab_size, dim]
    table, drawing any randomness from `generator` (seeded with the unit's seed), and `fingerprint`
    identifies it (recorded, and compared on resume). Whether it stays frozen is `[embedding] freeze`,
    which the core passes to the model's `set_embedding`.
    Optional `check()`: raise the DataError loading would raise, where finding out is cheap and downloads
    nothing (a missing local path, a hub file while offline); `run` and `validate` call it before any
    data is read (`newllm_kit.preflight`)."""

    def load(self, vocab_size: int, dim: int, generator: torch.Generator) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


class DataSource(Protocol):
    """A corpus of documents (each a list of turns), addressed by stable row indices: `size` is the
    number of rows, `documents(rows)` one non-empty list of turns per row in the order asked (the
    same every time), and `fingerprint` a hash of what was read. `[data] text` picks the turns that
    become a document's text (`newllm_kit.corpus.SCHEMES`).
    Optional `check()`: raise the DataError loading would raise, where finding out is cheap and downloads
    nothing (a missing local path, a hub file while offline); `run` and `validate` call it before any
    data is read (`newllm_kit.preflight`)."""

    def size(self) -> int: ...

    def documents(self, rows: Sequence[int]) -> list[list[str]]: ...

    def fingerprint(self) -> str: ...


@dataclass
class EvalOutputs:
    """Everything a metric may read: exact sums (float64 NLL, integer counts) over every scored
    validation position, and the recipe's named extras.

    Extras the built-in metrics read: "contexts" ([n, C] tensor, for effective_rank),
    "context_width" (int, its denominator) and "convergence_rate" (float). A metric whose extra is
    absent returns NaN ("—" in the table).

    `documents`, where the recipe knows the validation documents (`UnitData.val_documents`): the same
    sums per document, [D, 3] float64 (NLL, hits, scored positions), each position counted in the
    document of the token it predicts (`newllm_kit.documents`); they must add up to the totals. The
    core saves them beside the record, and `compare` resamples them."""

    nll_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    documents: np.ndarray | None = None


class Metric(Protocol):
    """A number computed from `EvalOutputs`. `name` is the name it is registered under, and the key in
    results ("val_<name>" in results.jsonl and results.csv, with the built-ins' historic names val_ppl,
    val_acc and val_er), `direction` is "min" or "max" (which way is better, the header's ↓ or ↑) and
    `unit` is shown in the end-of-run table's header (a unit starting with "fraction" shows as %)."""

    name: str
    direction: str
    unit: str

    def compute(self, outputs: EvalOutputs) -> float: ...


class Checkpointer(Protocol):
    """A unit's checkpoint folder inside the run directory (`UnitContext.checkpoint`).

    `save` publishes a whole checkpoint atomically (rank 0 writes, every rank calls it); `load` is
    the last one published, on every rank (rank 0 reads and broadcasts), or None. A checkpoint holds
    safetensors tensors and JSON, never pickles."""

    def load(self, check: Callable[[Saved], None] | None = None) -> Saved | None:
        """The published checkpoint, or None. `check(saved)` raises KeyError, TypeError or ValueError
        when it does not fit the model; then (as for a damaged file) the core warns, removes it and
        returns None, and the unit starts over."""
        ...

    def save(self, stage: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        """Publish `tensors` (groups of named tensors) and `state` (JSON) as the unit's checkpoint."""
        ...

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict without the frozen embedding table, which the core rebuilds from its
        source: what a recipe saves as the model's weights."""
        ...

    def file(self, name: str) -> Path:
        """A path in the unit's checkpoint folder for the recipe's own large data; write it with
        `write_stream`. It is removed with the checkpoint."""
        ...

    def write_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """`write(handle)` into `file(name)` atomically, by the rank that calls it (rank 0 for shared
        files; a ddp rank's own files carry its rank in the name)."""
        ...

    def append(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """`write(handle)` at the end of `file(name)`, synced to disk before it returns."""
        ...

    def discard(self) -> None:
        """Remove the unit's checkpoint and its files (rank 0 only)."""
        ...


@dataclass(frozen=True)
class Saved:
    """One published checkpoint: the recipe's stage name, tensor groups and JSON state."""

    stage: str
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


@dataclass
class UnitData:
    """A unit's token streams on `runner.device`: training ids (the first `samples` documents) and the
    validation ids, shared by every unit of a run. `train_documents` and `val_documents` are the
    [start, stop) spans of the documents in `train_ids` and `val_ids` (None: not known).

    `dev_ids` (with `dev_documents`), where `[data] dev` is set: the development stream. A recipe then
    early-stops (and restores its best epoch) on it and scores `val_ids` once, with the weights it
    ends on; without it, early stopping reads the validation stream (the seed's protocol)."""

    train_ids: torch.Tensor
    val_ids: torch.Tensor
    train_documents: np.ndarray  # [k, 2] int64: start, stop of each training document
    vocab_size: int
    val_documents: np.ndarray | None = None  # [d, 2] int64, the same for the validation documents
    dev_ids: torch.Tensor | None = None
    dev_documents: np.ndarray | None = None


@dataclass
class UnitContext:
    """What the core hands a recipe for one unit besides the model and the data."""

    id: str  # "A-300": names the unit in messages
    seed: int  # the unit's seed; the core seeded Python, NumPy and torch with it before building the model
    runner: Runner
    progress: Progress  # `advance` also appends the fields to metrics.jsonl (rank 0)
    checkpoint: Checkpointer
    scratch: Path  # an empty folder inside the run directory for large temporary files (removed after)
    metrics: Callable[[EvalOutputs], dict[str, float]]  # the configured metrics, e.g. for a training-set number

    def message(self, text: str) -> None:
        """One line for the user (progress bar or log), prefixed with the unit id."""
        self.progress.message(f"{self.id}: {text}")


@dataclass(frozen=True)
class Column:
    """A recipe's record field shown in the end-of-run table and results.csv: `key` in the record,
    `header` in the table, `percent` to show a fraction as %, `mean` to average it over seeds."""

    key: str
    header: str
    percent: bool = False
    mean: bool = False


@dataclass
class RecipeResult:
    """What a recipe returns for one unit. The core computes the configured metrics from `val`,
    adds `record` (JSON-able: the recipe's own numbers) to the unit's results record, and shows
    `columns` of it in the table; `notes` are recorded (say each with `unit.message` when it arises);
    `flags` mark a column's cell with * and a footnote ({record key: why}).

    For the kept models (`experiment.keep_models`): the model as returned holds the weights `val` was
    computed with (the best epoch's, where the recipe restored them); `final_weights` are the trained
    parameters at the last epoch where they differ from those (None: the model ends on its last epoch
    too); `ends_on_best` False says the model holds its last epoch's weights although `val` is an
    earlier epoch's (nothing restored), so no "best" model exists; `kept_tensors` are tensors the
    recipe's `decoder` and `evaluate` need beside the weights (see `Kept`)."""

    val: EvalOutputs
    record: dict[str, Any] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)
    final_weights: dict[str, torch.Tensor] | None = None
    ends_on_best: bool = True
    kept_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Kept:
    """What a kept model brings back besides its weights: the recipe's `kept_tensors` (on the model's
    device) and the unit's results record (what it was trained and evaluated with, e.g. a batch size
    resolved on its device)."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]


class Decoder(Protocol):
    """A kept model reading a stream token by token, for `sample` and the Hugging Face export."""

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """[t] ids that follow those fed so far -> [t, V] float32 logits of the token after each."""
        ...


class Recipe(Protocol):
    """How one unit is trained and evaluated: a built model and its token streams in, validation
    sums out. Everything a recipe computes over the validation stream must score every position
    1 … n−1 exactly once, so PPLs of different recipes on one run are comparable.

    Optional, for kept models (`newllm-kit sample`, `evaluate`, `export`); a recipe without them
    trains as before, and those commands say it cannot:

    * `decoder(model, kept) -> Decoder`: the trained model reading a stream as its validation did;
    * `evaluate(model, data, unit, kept) -> EvalOutputs`: the validation sums of `data.val_ids`
      computed by the same code as the run's validation (a kept model's own validation stream gives
      the record's numbers back)."""

    def train(self, model: nn.Module, data: UnitData, unit: UnitContext) -> RecipeResult: ...


@dataclass(frozen=True)
class UnitJob:
    """One unfinished unit of a run as a job: `newllm-kit <args>` runs it from the run directory alone
    (`run RUN_DIR --unit ID`), so nothing but these strings travels to the job. `distributed`: its
    runner is one process per device (ddp), so the launcher starts it under torchrun
    (`newllm_kit.launch.job_command`)."""

    unit: str
    args: list[str]
    distributed: bool = False


@dataclass
class LaunchRequest:
    """What a launcher gets: the run directory (on a filesystem every job can reach), one job per
    unfinished unit in plan order, and `say` for one-line progress. `detach`: submit and return
    without waiting (a launcher that cannot must raise a UserError saying so)."""

    run_dir: Path
    jobs: list[UnitJob]
    detach: bool
    say: Callable[[str], None]


class Launcher(Protocol):
    """Where the units of a grid run. `in_process` (the `sequential` launcher): the core runs the units
    itself, one after another, in this process (under torchrun too), and `launch` is not called.
    Otherwise `launch` starts every job on an existing engine (a local process pool, a cluster
    scheduler) and returns, unless detached, once every job has ended; the units' records, claims and
    failures in the run directory say how each went, so a launcher reports nothing else. Returns one
    line for the user about what it started (job ids), or None."""

    in_process: bool

    def launch(self, request: LaunchRequest) -> str | None: ...


@dataclass(frozen=True)
class TrackedRun:
    """Which unit a tracker watches: its id (the tracker run's name), the run's start number (`attempt`,
    as in metrics.jsonl), the experiment's name, and the run directory (`group`: its folder name, which
    groups the units of one run). Defaults that write files put them under `inside(*parts)`."""

    unit: str
    attempt: int
    experiment: str
    group: str
    run_dir: Path

    def inside(self, *parts: str) -> Path:
        """RUN_DIR/parts…, refused (UserError) where a link would lead it out of the run directory."""
        from .rundir import RunDir

        return RunDir(self.run_dir).inside(self.run_dir.joinpath(*parts))


class Tracker(Protocol):
    """One unit's run in an experiment tracker: a fresh object per unit, built and called on rank 0 only.
    The core calls `start` once, then `log_params` once (the unit's resolved configuration as dotted keys:
    `{"lm.epochs": 3, "models.0.label": "G"}`), `log_metrics` for every metrics.jsonl row as it is written
    (the row itself, `step` counting the unit's rows from 0), `log_record` and `log_artifacts` once when the
    unit finished (its results record; its PNG plots, where matplotlib is installed), and `end` once with
    "finished", "failed" or "interrupted". Trackers observe, never decide: the first exception from any call
    disables that backend for the rest of the run (one warning, listed in meta.json) and the run goes on.
    Optional `check()`: raise a UserError when the backend cannot work here (its package is not installed);
    `run` and `validate` call it before any data is read."""

    def start(self, run: TrackedRun) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, row: dict[str, Any], step: int) -> None: ...

    def log_record(self, record: dict[str, Any]) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def end(self, status: str) -> None: ...


# What a factory registered for each kind must return (see `newllm_kit.hookspecs`).
PROTOCOLS: dict[str, type] = {
    "architecture": Architecture,
    "recipe": Recipe,
    "tokenizer": TokenizerFactory,
    "embedding": EmbeddingSource,
    "metric": Metric,
    "data_source": DataSource,
    "runner": Runner,
    "launcher": Launcher,
    "tracker": Tracker,
}


_ABSENT = object()  # a member declared without a value


def member_defaults(protocol: type) -> dict[str, Any]:
    """The attribute members `protocol` declares with a value (`MemoryPolicy.context_store = "auto"`):
    optional, an object may leave them out and readers take the value instead."""
    found = {}
    for name in get_protocol_members(protocol):
        value = inspect.getattr_static(protocol, name, _ABSENT)
        if value is not _ABSENT and not callable(value) and not isinstance(value, property):
            found[name] = value
    return found


def member(obj: object, protocol: type, name: str) -> Any:
    """`obj.<name>`, or `protocol`'s default where `obj` leaves that optional member out."""
    return getattr(obj, name) if hasattr(obj, name) else member_defaults(protocol)[name]


def missing_members(obj: object, protocol: type) -> list[str]:
    """Members of `protocol` that `obj` lacks, by name only (not the optional ones): cheap enough to run
    before anything is trained, and it catches a factory that returns the wrong kind of object."""
    optional = member_defaults(protocol)
    return sorted(name for name in get_protocol_members(protocol) if name not in optional and not hasattr(obj, name))


def missing_methods(cls: type, protocol: type) -> list[str]:
    """Methods of `protocol` that a class lacks: the check possible without an instance."""
    return sorted(name for name in get_protocol_members(protocol)
                  if callable(getattr(protocol, name, None)) and not callable(getattr(cls, name, None)))
