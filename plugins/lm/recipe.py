"""The `lm` recipe: ordinary next-token training of autoregressive baselines (transformer, GRU, …).

Training reads the training stream in windows and takes AdamW steps with warm-up and cosine decay;
every training position is trained once per epoch. Evaluation scores every validation position 1 … n−1
exactly once with as much left context as the model allows, as the cvfp recipe scores every
position, so the PPLs of baselines and CVFP models on one run are comparable:

* attention models (`block_size` set) slide windows of `block_size` tokens by `eval_stride`; the
  first window scores all its positions, each later one only its last (not yet scored) positions,
  so every position sees at least `block_size − eval_stride + 1` tokens (itself included);
* recurrent models (`block_size` None) read the whole stream in segments of `window` tokens,
  carrying their state from segment to segment.

Training reads the stream as evaluation does:

* an attention model trains on consecutive windows, each from an empty context (as an evaluation
  window starts), shuffled or in stream order, `batch_size` per step;
* a recurrent model trains with truncated backpropagation through time (`state = "carried"`): the
  stream is cut into `batch_size` contiguous lanes, step k trains window k of every lane, and each
  lane's state is carried, detached, from one window to the next and emptied at every epoch's start
  (where the stream starts), so it learns to continue a state as evaluation asks it to.
  `state = "reset"` trains it on independent windows from an empty state instead, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl
from newllm_kit.documents import DocumentSums
from newllm_kit.errors import ConfigError, DataError
from newllm_kit.protocols import (
    Column,
    EvalOutputs,
    Kept,
    Placement,
    RecipeResult,
    Runner,
    Saved,
    UnitContext,
    UnitData,
)
from newllm_kit.training import (
    TrainState,
    head_cross_entropy,
    loss_pass,
    optimizer_step,
    ppl,
    spans,
    train_epochs,
)

from .contract import AutoregressiveModel
from .decode import LMDecoder
from .flops import unit_flops
from .windows import Window, eval_windows, lane_windows, train_windows

RECURRENT_WINDOW = 128  # tokens per training window of a recurrent model when [lm] window is unset
WARMUP_SHARE = 0.05  # of a run's steps warm up when [lm] warmup_steps is unset
MAX_CONTEXT_ROWS = 10_000  # hidden states kept for the effective-rank metric, taken evenly over the stream
Positive = Annotated[int, Field(ge=1, le=10**9)]  # bounded so a typo fails validation, not an allocation
Beta = Annotated[float, Field(ge=0, lt=1)]


class LMSettings(BaseModel):
    """The `[lm]` table."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=30, ge=1, le=100_000,
                        description="Maximum number of epochs, and the cosine decay's horizon: set above where "
                                    "early stopping ends a run (the baselines' Transformer: epoch 19 of 30).")
    patience: int = Field(default=3, ge=1, le=100_000,
                          description="Epochs without a strictly lower val loss before stopping; 3, as a small "
                                      "model's val loss can rise for an epoch or two before its largest drop.")
    learning_rate: float = Field(default=3e-3, gt=0, le=10, allow_inf_nan=False,
                                 description="Peak AdamW learning rate (after warm-up); 3e-3 suits baselines of "
                                             "≤ a few M parameters, larger ones want less (v2-baselines: 6e-4).")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1,
                                description="Cosine decay ends at learning_rate × min_lr_ratio.")
    warmup_steps: int | None = Field(
        default=None, ge=0, le=10**9,
        description=f"Steps of linear warm-up (at most the run's total steps); None: {WARMUP_SHARE:.0%} of the "
                    f"run's epochs × steps per epoch, so warm-up scales with the run, as the cosine decay does.")
    weight_decay: float = Field(default=0.1, ge=0, le=10, allow_inf_nan=False,
                                description="AdamW decay of matrices only (not biases, norms or embeddings).")
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                             description="Max gradient norm over the trained parameters.")
    batch_size: Positive | Literal["auto"] = Field(
        default=16, description='Windows per step (a recurrent model\'s lanes when its state is carried); "auto": '
                                "the runner's automatic batch of tokens divided by the window (recorded in the "
                                "results as lm_batch_size).")
    window: Positive | None = Field(
        default=None, description=f"Training window in tokens (None: the model's block_size; "
                                  f"{RECURRENT_WINDOW} for a recurrent model, also its evaluation segment and, "
                                  f"with its state carried, how far back gradients flow).")
    state: Literal["carried", "reset"] = Field(
        default="carried", description='Recurrent models: "carried" trains them as they are evaluated, by '
                                       "truncated backpropagation through time: batch_size contiguous lanes "
                                       "of the stream, read window by window in stream order, each lane's "
                                       "state carried (detached) to its next window and emptied at every "
                                       'epoch\'s start; "reset": independent windows from an empty state, in '
                                       "`order`. Attention models read windows from an empty context either way.")
    order: Literal["shuffled", "stream"] | None = Field(
        default=None, description="Order of independent windows per epoch: shuffled (seeded by the unit's seed "
                                  "and the epoch, so a resumed run repeats it) or stream order; None: shuffled. "
                                  'A carried state is read in stream order only ("shuffled" is refused).')
    eval_stride: Positive | None = Field(
        default=None, description="Attention models: positions each later evaluation window scores "
                                  "(None: block_size // 2); every position gets ≥ block_size − stride "
                                  "tokens of earlier context.")
    restore_best: bool = Field(default=True, description="End on the best epoch's weights.")
    ce_chunk: Positive = Field(default=2048, description="Rows per [chunk, vocab] logits block of the loss.")


class LMRecipeSettings(BaseModel):
    """The lm recipe's TOML tables: only `[lm]`."""

    model_config = ConfigDict(extra="forbid")

    lm: LMSettings = Field(default_factory=LMSettings, description="Training and evaluation of the lm recipe.")


def warmup_steps(total: int, settings: LMSettings) -> int:
    """The warm-up of a run of `total` steps: lm.warmup_steps (at most `total`), or its default share."""
    return min(settings.warmup_steps, total) if settings.warmup_steps is not None else int(total * WARMUP_SHARE)


def learning_rate_at(step: int, total: int, settings: LMSettings) -> float:
    """Linear warm-up, then cosine decay to learning_rate × min_lr_ratio: a pure function of the global
    step, so a resumed run follows the same schedule without scheduler state."""
    peak, warmup = settings.learning_rate, warmup_steps(total, settings)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    low = peak * settings.min_lr_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - low)


class ContextSample:
    """The final hidden states of at most `MAX_CONTEXT_ROWS` scored positions, evenly spread over the
    stream (the effective-rank metric's input), gathered on `device` and summed over ranks."""

    def __init__(self, positions: int, width: int, device: torch.device) -> None:
        kept = min(positions, MAX_CONTEXT_ROWS)
        self.row = torch.full((positions,), -1, dtype=torch.long, device=device)
        self.row[torch.arange(kept, device=device) * positions // kept] = torch.arange(kept, device=device)
        self.rows = torch.zeros(kept, width, device=device)

    def add(self, targets: torch.Tensor, states: torch.Tensor) -> None:
        """`states` [m, E] of the predictions of target positions `targets` [m] (1 … n−1)."""
        row = self.row[targets - 1]
        keep = row >= 0
        self.rows[row[keep]] = states[keep].detach().float()


class Batch(NamedTuple):
    inputs: torch.Tensor  # [b, t] ids of equal-length windows
    targets: torch.Tensor  # [m] stream positions (1 … n−1) of the scored predictions, row by row
    scored: torch.Tensor | None  # [b, t] mask of the scored predictions; None: all of them


def _batches(ids: torch.Tensor, windows: Sequence[Window]) -> list[Batch]:
    """One batch per group of equal-length windows (only a stream's last training window is shorter)."""
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.length, []).append(w)
    out = []
    for length, group in groups.items():
        offsets = torch.arange(length, device=ids.device)
        index = torch.tensor([w.start for w in group], device=ids.device)[:, None] + offsets
        if any(w.skip for w in group):
            scored = offsets >= torch.tensor([w.skip for w in group], device=ids.device)[:, None]
            out.append(Batch(ids[index].long(), index[scored] + 1, scored))
        else:  # training: every prediction scored, no masked copy of the hidden states
            out.append(Batch(ids[index].long(), index.flatten() + 1, None))
    return out


def _lane_batch(ids: torch.Tensor, windows: Sequence[Window]) -> Batch:
    """One step's windows of consecutive lanes as one [lanes, t] batch, so the state's rows stay the lanes';
    a window shorter than the longest (the last lane's, at the stream's end) is padded with unscored ids."""
    offsets = torch.arange(max(w.length for w in windows), device=ids.device)
    index = torch.tensor([w.start for w in windows], device=ids.device)[:, None] + offsets
    scored = offsets < torch.tensor([w.length for w in windows], device=ids.device)[:, None]
    inputs = ids[index.clamp(max=ids.numel() - 1)].long()
    return Batch(inputs, index[scored] + 1, None if bool(scored.all()) else scored)


def _detached(state: Any) -> Any:
    """A recurrent state cut from the graph (truncated BPTT): a tensor, or tuples, lists or dicts of them."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {key: _detached(value) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(_detached(value) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_detached(value) for value in state)
    return state


class CarriedStates:
    """A recurrent model's states after the last trained window, one per micro-batch of lanes (a state is
    opaque: only the model knows where its rows are). A new one, empty, starts every epoch. A micro-batch
    halved after running out of memory regroups the lanes, so their states start over there (rare; the
    runner logs it)."""

    def __init__(self) -> None:
        self.micro = 0
        self.states: list[Any] = []


def _pass(model: AutoregressiveModel, ids: torch.Tensor, windows: Sequence[Window], runner: Runner, chunk: int,
          grad_scale: float | None, sample: ContextSample | None = None, documents: DocumentSums | None = None,
          carried: CarriedStates | None = None) -> tuple[float, int]:
    """NLL sum and hits over the scored predictions of `windows` (`newllm_kit.training.loss_pass`),
    backpropagating loss × `grad_scale` if given; the scored hidden states go to `sample` if given, and
    the sums per document to `documents` if given. With `carried`, `windows` are one step of lanes, each
    continuing from its state in `carried`, which then holds their new states."""
    attempt: list[DocumentSums] = []  # this attempt's per-document sums: a retried pass starts them over
    new_states: list[Any] = []  # this attempt's carried states, kept once the whole pass has run

    def losses(micro: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        attempt[:] = [] if documents is None else [documents.empty()]
        new_states.clear()
        if carried is not None and carried.micro != micro:  # the epoch's first step, or lanes regrouped
            carried.micro, carried.states = micro, []
        for group, span in enumerate(spans(range(len(windows)), micro)):
            previous = carried.states[group] if carried is not None and group < len(carried.states) else None
            if carried is not None and not any(w.length for w in windows[span.start:span.stop]):
                new_states.append(previous)  # lanes that have ended (the stream's last, at its end)
                continue
            batches = (_batches(ids, windows[span.start:span.stop]) if carried is None
                       else [_lane_batch(ids, windows[span.start:span.stop])])
            for batch in batches:
                with runner.autocast():
                    hidden, state = model.hidden(batch.inputs, previous)
                    states = hidden.flatten(0, 1) if batch.scored is None else hidden[batch.scored]
                    weight, bias = model.output_head()
                    targets = ids[batch.targets].long()
                    scored = (attempt[0].score(states, weight, bias, targets, batch.targets, chunk) if attempt
                              else head_cross_entropy(states, weight, bias, targets, chunk,
                                                      count_correct=grad_scale is None))
                if sample is not None:
                    sample.add(batch.targets, states)
                if carried is not None:
                    new_states.append(_detached(state))
                yield scored

    totals = loss_pass(cast(nn.Module, model), runner, len(windows), losses, grad_scale, phase="lm")
    if documents is not None:
        documents.sums += attempt[0].sums
    if carried is not None:
        carried.states = list(new_states)
    return totals


def _recurrent_pass(model: AutoregressiveModel, ids: torch.Tensor, window: int, runner: Placement, chunk: int,
                    sample: ContextSample, documents: DocumentSums) -> tuple[float, int, int]:
    """The whole stream in segments of `window` tokens, one after another, carrying the model's state."""
    nll, hits, count, state = 0.0, 0, 0, None
    for w in train_windows(ids.numel() - 1, window):
        targets = torch.arange(w.start + 1, w.start + w.length + 1, device=ids.device)
        with runner.autocast():
            states, state = model.hidden(ids[None, w.start:w.start + w.length].long(), state)
            weight, bias = model.output_head()
            loss, correct = documents.score(states[0], weight, bias, ids[targets].long(), targets, chunk)
        sample.add(targets, states[0])
        nll, hits, count = nll + loss.item(), hits + int(correct.item()), count + w.length
    return nll, hits, count


@torch.no_grad()
def evaluate(model: AutoregressiveModel, ids: torch.Tensor, runner: Runner, *, window: int, stride: int | None,
             tokens: int, ce_chunk: int, seed: int = 0, documents: np.ndarray | None = None) -> EvalOutputs:
    """Summed NLL, hits and count (n − 1) over every position of the stream `ids`, summed over ranks, with
    a sample of the scored positions' hidden states as extras (see the module docstring for the rule).
    `window`: a recurrent model's segment; `stride`: an attention model's (None: block_size // 2);
    `tokens`: an attention model's tokens per pass (whole windows, at least one); `documents`: the
    stream's [D, 2] document spans, to sum per document as well (the totals are the documents' sums)."""
    module = cast(nn.Module, model)
    was_training, positions = module.training, ids.numel() - 1
    module.eval()
    sample = ContextSample(positions, model.embedding_dim, runner.device)
    sums = DocumentSums.of(documents, ids.numel(), runner.device)
    if model.block_size is None:  # a sequential pass cannot be split over ranks: rank 0 runs it
        if runner.rank == 0:
            _recurrent_pass(model, ids, window, runner, ce_chunk, sample, sums)
    else:
        windows = eval_windows(positions, model.block_size, stride or max(model.block_size // 2, 1))
        mine, batch = runner.shard(len(windows)), max(tokens // windows[0].length, 1)
        for s in spans(mine, batch):
            _pass(model, ids, windows[s.start:s.stop], runner, ce_chunk, None, sample, sums)
    module.train(was_training)
    if runner.world_size > 1:  # [D, 3] float64: exact over ranks
        sums.sums = runner.all_reduce_sum(sums.sums)
        sample.rows = runner.all_reduce_sum(sample.rows)
    totals = sums.sums.sum(0).cpu()
    if int(totals[2]) != positions:
        raise RuntimeError(f"lm evaluation scored {int(totals[2])} positions of {positions}")
    return EvalOutputs(nll_sum=float(totals[0]), correct=int(totals[1]), count=positions, seed=seed,
                       extras={"contexts": sample.rows.cpu(), "context_width": model.embedding_dim},
                       documents=sums.result())


def _optimizer(model: nn.Module, params: list[nn.Parameter], settings: LMSettings) -> torch.optim.AdamW:
    """AdamW that decays matrices only: biases, norm gains and embedding tables are left undecayed."""
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in tables]
    kept = [p for p in params if p.ndim < 2 or id(p) in tables]
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, settings.weight_decay), (kept, 0.0)) if g]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas)


def _checkpoint_fits(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, window: int,
                     settings: LMSettings, *, carried: bool) -> Callable[[Saved], None]:
    """The check handed to `Checkpointer.load`: every field is checked before the recipe uses it. The saved
    weights must be this model's, by name, shape and dtype, finite, and include every trainable one (the
    frozen table is rebuilt by the core, so it may be absent); the epochs must have been cut into the same
    windows, read the same way (lanes with a `carried` state, or independent windows), in batches of the
    configured size (any positive one for "auto": it was resolved on the device that wrote it); the
    training state must continue these settings (`TrainState.check_resume`). No carried state is saved:
    checkpoints are written after epochs, and every epoch starts from an empty state."""
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def check(saved: Saved) -> None:
        if saved.stage != "lm":
            raise ValueError(f"checkpoint stage {saved.stage!r} is not the lm recipe's")
        missing = [f"tensors[{k!r}]" for k in ("model", "train") if k not in saved.tensors]
        missing += [f"state[{k!r}]" for k in ("train", "lm") if k not in saved.state]
        if missing:
            raise ValueError(f"checkpoint lacks {', '.join(missing)}")
        for name, tensor in saved.tensors["model"].items():
            if shapes.get(name) != (tuple(tensor.shape), tensor.dtype):
                raise ValueError(f"checkpoint weight {name} {tuple(tensor.shape)} {tensor.dtype} does not fit "
                                 f"the model")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"checkpoint weight {name} holds NaN or infinite values")
        if absent := sorted(trainable - saved.tensors["model"].keys()):
            raise ValueError(f"checkpoint lacks the model's weights {', '.join(absent[:3])}")
        lm = saved.state["lm"]
        if not isinstance(lm, dict) or lm.get("window") != window or isinstance(lm.get("window"), bool):
            got = lm.get("window") if isinstance(lm, dict) else lm
            raise ValueError(f"checkpoint was trained on windows of {got!r} tokens, not {window}")
        reading = "carried" if carried else "reset"
        if lm.get("state", "reset") != reading:  # checkpoints without it trained independent windows
            raise ValueError(f"checkpoint was trained with lm.state = {lm.get('state', 'reset')!r}, not {reading!r}")
        batch = lm.get("batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 10**9 \
                or settings.batch_size not in ("auto", batch):
            raise ValueError(f"checkpoint batch_size {batch!r} is not the configured {settings.batch_size!r}")
        TrainState.from_checkpoint(saved.tensors["train"], saved.state["train"]).check_resume(
            model, params, optimizer, epochs=settings.epochs, patience=settings.patience,
            restore_best=settings.restore_best, saved_lr=False)  # the schedule sets it before every step

    return check


def _bytes_per_token(params: list[nn.Parameter], width: int) -> int:
    """Cost model for an automatic batch: activations grow with depth × width, parameters with depth ×
    width², so 8 bytes per trainable parameter per unit of width is one token's generous share (fp32)."""
    return max(8 * sum(p.numel() for p in params) // width, 4 * width)


class LMRecipe:
    """The `lm` recipe factory: validated `[lm]` settings in, `train(model, data, unit)` per unit."""

    model_protocol: ClassVar[type] = AutoregressiveModel  # checked by name when an experiment file is loaded

    def __init__(self, settings: LMRecipeSettings | None = None) -> None:
        self.settings = (settings if settings is not None else LMRecipeSettings()).lm

    def _plan(self, model: AutoregressiveModel) -> tuple[int, int | None]:
        """(training window, evaluation stride) for this model, refusing what it cannot read."""
        s, block = self.settings, model.block_size
        if block is None:
            return s.window or RECURRENT_WINDOW, None
        for key, value in (("window", s.window), ("eval_stride", s.eval_stride)):
            if value is not None and value > block:
                raise ConfigError(f"lm.{key} = {value} is longer than the model's block_size {block}; "
                                  f"set lm.{key} ≤ {block}")
        return s.window or block, s.eval_stride or max(block // 2, 1)

    def _carries_state(self, model: AutoregressiveModel) -> bool:
        """Whether training carries the model's state across windows: a recurrent model, lm.state = "carried"."""
        if model.block_size is not None or self.settings.state == "reset":
            return False
        if self.settings.order == "shuffled":
            raise ConfigError('lm.order = "shuffled" would break the state lm.state = "carried" carries from '
                              'window to window; leave lm.order out, or set lm.state = "reset"')
        return True

    def train(self, model: nn.Module, data: UnitData, unit: UnitContext) -> RecipeResult:
        s, runner, lm_model = self.settings, unit.runner, cast(AutoregressiveModel, model)
        groups = lm_model.param_groups()
        if "train" not in groups:
            raise ConfigError(f"the lm recipe trains param_groups()['train'], but {type(model).__name__} has "
                              f"only {sorted(groups)}; use its own recipe ([[models]] recipe = …)")
        params = [p for p in groups["train"] if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(model).__name__} has nothing to train: its 'train' group is empty or frozen")
        if data.train_ids.numel() < 2 or data.val_ids.numel() < 2:
            raise DataError("the lm recipe needs at least 2 tokens in both the training and the validation stream")
        window, stride = self._plan(lm_model)
        carried = self._carries_state(lm_model)

        optimizer = _optimizer(model, params, s)
        saved = unit.checkpoint.load(_checkpoint_fits(model, params, optimizer, window, s, carried=carried))
        if saved is not None:
            model.load_state_dict(saved.tensors["model"], strict=False)
            batch = saved.state["lm"]["batch_size"]  # as first resolved: "auto" may differ on this device
        elif s.batch_size == "auto":  # the runner sizes a batch of tokens (a collective under ddp)
            batch = max(runner.batch_size(None, _bytes_per_token(params, lm_model.embedding_dim)) // window, 1)
        else:
            batch = s.batch_size
        positions = data.train_ids.numel() - 1
        lanes = lane_windows(positions, batch, window) if carried else []  # step k: window k of every lane
        windows = [] if carried else train_windows(positions, window)
        steps_per_epoch = len(lanes) if carried else math.ceil(len(windows) / batch)
        total_steps = s.epochs * steps_per_epoch
        reading = (f"{len(lanes[0])} lanes of ≤ {-(-positions // batch):,} tokens read in training windows of "
                   f"≤ {window}, state carried" if carried else f"{len(windows):,} training windows of ≤ {window} "
                   f"tokens, {batch} per step ({s.order or 'shuffled'})")
        unit.message(f"lm: {reading}, {steps_per_epoch:,} steps per epoch, warm-up "
                     f"{warmup_steps(total_steps, s):,} of {total_steps:,}; evaluation "
                     + ("carries the state through the stream" if stride is None else f"stride {stride}"))

        def epoch_steps(epoch: int) -> list[list[Window]]:
            """The windows of each step: window k of every lane, or `batch` windows in the epoch's order."""
            if carried:
                return lanes
            order = list(range(len(windows)))
            if s.order != "stream":  # distinct (seed, epoch) pairs give distinct generator seeds
                generator = torch.Generator().manual_seed((unit.seed * 1_000_003 + epoch) % 2**63)
                order = torch.randperm(len(windows), generator=generator).tolist()
            return [[windows[order[i]] for i in rows] for rows in spans(range(len(order)), batch)]

        def run_epoch(epoch: int) -> tuple[float, int]:
            states = CarriedStates() if carried else None  # empty at the epoch's start, where the stream starts
            train_nll = 0.0
            for step, chosen in enumerate(epoch_steps(epoch), start=1):
                lr = learning_rate_at((epoch - 1) * steps_per_epoch + step - 1, total_steps, s)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                part = runner.shard(len(chosen))  # this rank's share (of the lanes: the same ones every step)
                scale = 1 / sum(w.length for w in chosen)  # all ranks step together on the global batch's mean
                nll, _ = _pass(lm_model, data.train_ids, chosen[part.start:part.stop], runner, s.ce_chunk, scale,
                               carried=states)
                train_nll += optimizer_step(params, optimizer, nll, runner, s.grad_clip,
                                            f"lm, epoch {epoch}, step {step}",
                                            f"lower lm.learning_rate (now {lr:.3g}) or lm.grad_clip, or raise "
                                            f"lm.warmup_steps")
            return train_nll, len(data.train_ids) - 1

        def validate(dev: bool = data.dev_ids is not None) -> EvalOutputs:
            """The early-stopping stream (the development one where there is one), or `dev=False` validation."""
            ids, documents = (data.dev_ids, data.dev_documents) if dev else (data.val_ids, data.val_documents)
            assert ids is not None
            return evaluate(lm_model, ids, runner, window=window, stride=stride, tokens=batch * window,
                            ce_chunk=s.ce_chunk, seed=unit.seed, documents=documents)

        def save(state: TrainState) -> None:
            tensors, json_state = state.to_checkpoint()
            unit.checkpoint.save("lm", {"model": unit.checkpoint.model_state(model), "train": tensors},
                                 {"train": json_state, "lm": {"batch_size": batch, "window": window,
                                                              "state": "carried" if carried else "reset"}})

        start = None if saved is None else TrainState.from_checkpoint(saved.tensors["train"], saved.state["train"])
        report = train_epochs(model, params, optimizer, epochs=s.epochs, patience=s.patience,
                              restore_best=s.restore_best, phase="lm", run_epoch=run_epoch, evaluate=validate,
                              progress=unit.progress, start=start, on_epoch_end=save,
                              stream="val" if data.dev_ids is None else "dev")
        selected = report.val  # the best epoch's sums on the early-stopping stream
        val = selected if data.dev_ids is None else validate(dev=False)  # a development split: scored once, now
        if "contexts" not in val.extras:  # the best epoch was evaluated before a resume: its extras were not saved
            val.extras = validate(dev=False).extras
        val.seed = unit.seed
        notes = []
        if s.warmup_steps is not None and s.warmup_steps > total_steps:
            notes.append(f"lm.warmup_steps = {s.warmup_steps} exceeds the run's {total_steps} steps: "
                         f"the learning rate warmed up over all of them")
            unit.message(notes[-1])
        record = {"best_epoch": report.best_epoch, "epochs_run": report.epochs_run, "lm_batch_size": batch,
                  "window": window, "eval_stride": stride, "steps": report.epochs_run * steps_per_epoch,
                  "history": report.history, "seconds": {"train": report.seconds},
                  **unit_flops(lm_model, report.epochs_run, window, stride, data)}
        if data.dev_ids is not None:  # what selected the epoch; `val` is the validation split's, scored once
            record |= {"dev_loss": selected.nll_sum / selected.count, "dev_ppl": ppl(selected.nll_sum / selected.count)}
        return RecipeResult(val=val, record=record, notes=notes,
                            columns=[Column("best_epoch", "Best epoch"), Column("epochs_run", "Epochs"),
                                     Column("train_flops", "FLOPs")],
                            final_weights=report.final_weights, ends_on_best=report.ends_on_best)

    def decoder(self, model: nn.Module, kept: Kept) -> LMDecoder:
        """The kept model reading a stream as it is sampled (`newllm_kit_plugins.lm.decode`)."""
        return LMDecoder(model)

    def evaluate(self, model: nn.Module, data: UnitData, unit: UnitContext, kept: Kept) -> EvalOutputs:
        """The run's validation of a kept model on `data.val_ids`, with the windows and the batch it ran."""
        lm_model = cast(AutoregressiveModel, model)
        window, stride = self._plan(lm_model)
        batch = kept.record.get("lm_batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            batch = self.settings.batch_size if isinstance(self.settings.batch_size, int) else 1
        return evaluate(lm_model, data.val_ids, unit.runner, window=window, stride=stride, tokens=batch * window,
                        ce_chunk=self.settings.ce_chunk, seed=unit.seed, documents=data.val_documents)


@hookimpl
def register_recipes(register: Any) -> None:
    register("lm", LMRecipe, settings=LMRecipeSettings,
             description="autoregressive next-token training (AdamW, cosine) with every-position evaluation")
