"""Phase 2: next-token training of the TokenBlock (and any trainable head) over frozen contexts.

The ContextBlock is frozen, so the caller solves both streams' contexts once and every epoch reuses
them (spec §7.3). Only the final-layer context of each position is kept; a batch's per-layer
contexts are one batched ContextBlock step away, c_{i−1} → h_1..h_L(i), so a stream costs C floats
per position instead of Σ d_j + T. The walk is the reference's (§4.3–4.4): stream order,
consecutive mini-batches, mean CE, clip, Adam, then validation and patience-based early stopping.
The head's [b, V] logits are what ran out of memory (§7.4), so the loss never holds more than one
[chunk, V] block of them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import DataError, RunFailed
from .protocols import EvalOutputs, Model, Progress, Runner
from .spans import token_span

Positions = Annotated[int, Field(ge=1, le=10**9)]  # bounded so a typo fails validation, not an allocation


class Phase2Settings(BaseModel):
    """The `[phase2]` section. Defaults are the v2 runs' (spec §4)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1, le=100_000, description="Maximum number of epochs.")
    patience: int = Field(default=1, ge=1, le=100_000,
                          description="Epochs without a lower val loss before stopping.")
    learning_rate: float = Field(default=0.001, gt=0, allow_inf_nan=False, description="Adam learning rate.")
    batch_size: Positions | Literal["auto"] = Field(
        default=1024, description='Positions per step, in stream order; "auto": the runner sizes it from '
                                  'device memory (gpu) or uses 512 (cpu), recorded in the results.')
    eval_batch_size: Positions | Literal["auto"] | None = Field(
        default=None, description='Positions per evaluation pass (None: batch_size; "auto": the runner\'s size).')
    grad_clip: float = Field(default=1.0, gt=0, description="Max gradient norm over the trained parameters.")
    restore_best: bool = Field(default=True, description="End on the best epoch's weights (False: on the "
                                                         "last epoch's, as the original did).")
    ce_chunk: int = Field(default=2048, ge=1, le=10**9,
                          description="Rows per [chunk, vocab] logits block of the loss.")
    train_contexts: Literal["rollout", "phase1"] = Field(
        default="rollout",
        description='Training-stream contexts: "rollout", the frozen sequential solve (v2\'s numbers); '
                    '"phase1", F(P_{i−1}, x_i) from Phase 1\'s final contexts in one batched pass, as the '
                    "reference's later code did (no sequential pass over the training stream).")
    compare_contexts: bool = Field(
        default=True, description="Record how far the phase1 contexts are from the rollout (cosine, MSE) "
                                  "on the first compare_tokens training tokens.")
    compare_tokens: int = Field(default=4096, ge=2, le=10**9,
                                description="Training tokens the context comparison covers.")


def _logit_blocks(ctx: Any, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, their states, their logits as a [V, rows] block), chunk by chunk. Vocabulary-major blocks
    keep every head matmul a fast GEMM (CPU BLAS ran [rows, V] outputs at ~60 % of that speed)."""
    w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)[:, None]
    for start in range(0, states.shape[0], ctx.chunk):
        rows = slice(start, start + ctx.chunk)
        s = states[rows].to(ctx.dtype)
        yield rows, s, (w @ s.T if b is None else torch.addmm(b, w, s.T)).to(ctx.acc)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed CE of `states @ weight.T + bias`. Forward keeps its inputs and the per-row logsumexp
    ([b], tiny); backward recomputes each logits block and turns it into softmax − onehot in place."""

    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, count: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kind, ctx.chunk = states.device.type, chunk  # matmuls in autocast's dtype when it is on
        ctx.dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else states.dtype
        ctx.acc = torch.promote_types(ctx.dtype, torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=states.device)
        lse = torch.empty(states.shape[0], dtype=ctx.acc, device=states.device)
        picked = torch.empty_like(lse)
        for rows, s, z in _logit_blocks(ctx, states, weight, bias):
            t = targets[rows]
            picked[rows], top = z[t, torch.arange(t.shape[0], device=t.device)], z.amax(0)
            lse[rows] = z.sub_(top).exp_().sum(0).log_() + top  # in place; the maxima become exactly 1
            if count:  # argmax == target: the target attains the maximum, and no earlier token does
                hit, unique = picked[rows] == top, z.floor_().sum(0) == 1  # floor(e) = 1 only where e = 1
                correct += (hit & unique).sum()
                if (unsure := hit & ~unique).any():  # tied maxima (rare): an exact argmax, row-major
                    b = None if bias is None else bias.to(ctx.dtype)
                    correct += (F.linear(s[unsure], weight.to(ctx.dtype), b).argmax(-1) == t[unsure]).sum()
            del z  # the next block may take its memory
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.mark_non_differentiable(correct)
        return (lse - picked).sum(), correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        states, weight, bias, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[2] else None
        for rows, s, z in _logit_blocks(ctx, states, weight, bias):
            t = targets[rows]
            z.sub_(lse[rows]).exp_()  # softmax, in place
            z[t, torch.arange(t.shape[0], device=t.device)] -= 1
            g = z.to(ctx.dtype)  # dCE/dlogits of the rows, [V, rows]; grad_loss scales the small results
            del z
            if grad_states is not None:
                grad_states[rows] = (g.T @ w) * grad_loss
            if grad_weight is not None:
                grad_weight += g @ (s * grad_loss)
            if grad_bias is not None:
                grad_bias += g.sum(1) * grad_loss
        return grad_states, grad_weight, grad_bias, None, None, None


def head_cross_entropy(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, chunk: int = 2048, count_correct: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, top-1 hits) of `states @ weight.T + bias`, as `F.cross_entropy(..., reduction="sum")`
    but with one [chunk, V] logits block alive at a time; matmuls follow autocast. Hits: 0 unless counted."""
    return _HeadCrossEntropy.apply(states, weight, bias, targets, chunk, count_correct)


def input_weights(model: Model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights the token inputs read, by name (a tied, unfrozen embedding table).

    Phase 2 trains such a table as the output head, but the contexts were solved from token inputs
    of its values now: the per-batch token inputs and contexts must keep those values. Autograd
    finds the weights, whatever the architecture; usually there are none and nothing is copied."""
    named = {name: p for name, p in cast(nn.Module, model).named_parameters() if p.requires_grad}
    with torch.enable_grad():
        probe = model.token_inputs(ids[:1])
    if not named or not probe.requires_grad:
        return {}
    used = torch.autograd.grad(probe.sum(), list(named.values()), allow_unused=True)
    return {name: p.detach().clone() for (name, p), g in zip(named.items(), used, strict=True) if g is not None}


@contextmanager
def weights_as(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`module`'s named parameters hold `values` inside the block (swapped in, not copied)."""
    params = dict(module.named_parameters())
    saved = {name: params[name].data for name in values}
    try:
        for name, value in values.items():
            params[name].data = value
        yield
    finally:
        for name, value in saved.items():
            params[name].data = value


@dataclass
class Phase2Data:
    """One stream for Phase 2: position i reads context `contexts[i − 1]` (zeros for i = 0) and token i,
    and predicts ids[i + 1]. `contexts` is the frozen rollout's final layer, [n, C] on any device, in
    any dtype (a pinned host tensor or a memory-mapped file for long streams); `input_weights` are
    the weights the contexts were solved with, where Phase 2 trains them (see `input_weights`)."""

    contexts: torch.Tensor
    ids: torch.Tensor
    input_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.ids.numel() - 1

    @torch.no_grad()
    def batch(self, model: Model, rows: range, to: torch.device
              ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-layer contexts, token inputs and targets of `rows` on `to`: the token inputs from the ids
        and every layer from one batched step of the frozen block, h_1..h_L(i) = F(c_{i−1}, x_i)."""
        lo, hi = rows.start, rows.stop
        block = model.context_block
        with weights_as(cast(nn.Module, model), self.input_weights):
            tokens = token_span(model, self.ids, lo, hi)
        previous = self.contexts[max(lo - 1, 0):hi - 1].to(to, non_blocking=True).to(tokens.dtype)
        if lo == 0:
            previous = torch.cat([previous.new_zeros(1, previous.shape[1]), previous])
        layers = block.step(previous, block.project_tokens(tokens))
        return layers, tokens, self.ids[lo + 1:hi + 1].to(to, torch.long)


@torch.no_grad()
def context_agreement(model: Model, phase1: Phase2Data, rollout: torch.Tensor, to: torch.device) -> dict[str, float]:
    """How close the contexts of the two Phase-2 paths are on the rows of `rollout`: the final layer of
    F(P_{i−1}, x_i) from `phase1`'s store (Phase 1's final contexts) against the sequential rollout's
    [m, C] contexts. The reference's own check when it adopted the fast path (spec §7 item 7)."""
    rows = range(0, rollout.shape[0])
    module = cast(nn.Module, model)
    was_training = module.training
    module.eval()
    fast = torch.cat([phase1.batch(model, span, to)[0][-1].float() for span in _spans(rows, 4096)])
    module.train(was_training)
    slow = rollout.to(to, torch.float32)
    cosine = F.cosine_similarity(fast, slow, dim=1)
    return {"tokens": float(len(rows)), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "mse": float((fast - slow).pow(2).mean())}


@dataclass
class Phase2State:
    """What a checkpoint holds after a finished epoch: enough to continue bit-identically."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.inf
    counter: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    model: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable parameters only
    optimizer: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    best_val: EvalOutputs | None = None
    rng: torch.Tensor | None = None
    seconds: float = 0.0

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors for safetensors and the rest for JSON: a checkpoint holds data, never code."""
        tensors = {f"model/{k}": v for k, v in self.model.items()}
        tensors |= {f"best/{k}": v for k, v in self.best_weights.items()}
        if self.rng is not None:
            tensors["rng"] = self.rng
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in self.optimizer.get("state", {}).items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        best = None if self.best_val is None else {
            f.name: getattr(self.best_val, f.name) for f in fields(EvalOutputs) if f.name != "contexts"}
        data = {"epoch": self.epoch, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "counter": self.counter, "history": self.history, "seconds": self.seconds, "best_val": best,
                "optimizer": {"param_groups": self.optimizer.get("param_groups", []), "state": scalars}}
        return tensors, data

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> Phase2State:
        """The inverse of `to_checkpoint`; tensors may be on any device (the RNG state goes to the CPU,
        and so does Adam's step count, where the optimizer keeps it)."""
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in data["optimizer"]["state"].items()}
        for name, value in group("optimizer/").items():
            index, key = name.split("/", 1)
            state.setdefault(int(index), {})[key] = value.cpu() if key == "step" else value
        best = data["best_val"]
        return cls(epoch=int(data["epoch"]), best_epoch=int(data["best_epoch"]),
                   best_val_loss=float(data["best_val_loss"]), counter=int(data["counter"]),
                   history=[dict(row) for row in data["history"]], model=group("model/"),
                   optimizer={"state": state, "param_groups": list(data["optimizer"]["param_groups"])},
                   best_weights=group("best/"), best_val=None if best is None else EvalOutputs(**best),
                   rng=tensors["rng"].cpu() if "rng" in tensors else None, seconds=float(data["seconds"]))


@dataclass
class Phase2Report:
    best_epoch: int  # 1-based
    epochs_run: int
    history: list[dict[str, float]]
    val: EvalOutputs  # at the best epoch
    seconds: float
    batch_size: int = 0  # positions per step as run ("auto" resolved)


class StopDecision(NamedTuple):
    best: float
    counter: int
    improved: bool
    stop: bool


def early_stop_update(best: float, counter: int, val_loss: float, patience: int) -> StopDecision:
    """Spec §4.4: only a strictly lower val loss resets the counter; stop once it reaches `patience`."""
    if val_loss < best:
        return StopDecision(val_loss, 0, True, False)
    return StopDecision(best, counter + 1, False, counter + 1 >= patience)


def bytes_per_position(model: Model) -> int:
    """Cost model for an automatic batch: one position's per-layer contexts and token input in fp32,
    about five times over (recomputed inputs, layer activations kept for backward, gradients). The
    [chunk, V] logits of the loss are bounded by ce_chunk, not by the batch, so they are not part of it."""
    return 4 * 5 * (sum(model.layer_widths) + model.token_width)


def resolve_batch(requested: int | Literal["auto"], model: Model, runner: Runner) -> int:
    """A number from the file, or the runner's choice (a collective under ddp: every rank calls it)."""
    return runner.batch_size(None if requested == "auto" else requested, bytes_per_position(model))


def _spans(rows: range, size: int) -> list[range]:
    return [range(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, max(size, 1))]


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _trainable(module: nn.Module, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of the trained parameters, by name: a checkpoint must not alias live weights."""
    wanted = {id(p) for p in params}
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters() if id(p) in wanted}


def _pass(model: Model, data: Phase2Data, rows: range, runner: Runner, chunk: int,
          grad_scale: float | None) -> tuple[float, int]:
    """NLL sum and hits over `rows` in micro-batches, backpropagating loss × `grad_scale` if given.
    After an OOM the runner may shrink its micro-batch: then the whole pass is retried."""
    while True:
        try:
            nll, hits = 0.0, 0
            for span in _spans(rows, runner.micro_batch(len(rows))):
                contexts, tokens, targets = data.batch(model, span, runner.device)
                with runner.autocast():
                    weight, bias = model.output_head()
                    loss, correct = head_cross_entropy(model.token_states(contexts, tokens), weight, bias,
                                                       targets, chunk, count_correct=grad_scale is None)
                if grad_scale is not None:
                    (loss * grad_scale).backward()
                nll, hits = nll + loss.item(), hits + int(correct.item())
            return nll, hits
        except torch.OutOfMemoryError as err:
            if not runner.handle_oom(err, len(rows)):
                raise
            cast(nn.Module, model).zero_grad(set_to_none=True)  # drop the failed attempt's partial sums


def _sum_over_ranks(params: list[nn.Parameter], loss_sum: float, runner: Runner) -> float:
    """Sum gradients (each rank's already scaled by 1/global batch) and the loss over ranks."""
    if runner.world_size == 1:
        return loss_sum
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = runner.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p)
    return float(runner.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64, device=runner.device)))


@torch.no_grad()
def evaluate(model: Model, data: Phase2Data, settings: Phase2Settings, runner: Runner) -> EvalOutputs:
    """Summed NLL, top-1 hits and count over every position of `data`, in eval mode, summed over ranks."""
    module = cast(nn.Module, model)
    was_training = module.training
    module.eval()
    mine = runner.shard(data.positions)
    spans = _spans(mine, resolve_batch(settings.eval_batch_size or settings.batch_size, model, runner))
    sums = [(*_pass(model, data, rows, runner, settings.ce_chunk, None), len(rows)) for rows in spans]
    module.train(was_training)
    totals = torch.tensor(sums, dtype=torch.float64).reshape(-1, 3).sum(0)  # exact: float64 and ints
    if runner.world_size > 1:
        totals = runner.all_reduce_sum(totals.to(runner.device)).cpu()
    return EvalOutputs(nll_sum=float(totals[0]), correct=int(totals[1]), count=int(totals[2]))


def train_phase2(model: Model, train: Phase2Data, val: Phase2Data, settings: Phase2Settings, runner: Runner,
                 progress: Progress, *, start: Phase2State | None = None,
                 on_epoch_end: Callable[[Phase2State], None] | None = None) -> Phase2Report:
    """Train `model.param_groups()["phase2"]` on frozen contexts, early-stopping on validation loss.
    `on_epoch_end` gets a self-contained `Phase2State` after each epoch; `start=` it to resume there."""
    if train.positions < 1 or val.positions < 1:
        raise DataError("phase 2 needs at least 2 tokens in both the training and the validation stream")
    module = cast(nn.Module, model)
    params = [p for p in model.param_groups()["phase2"] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    state = Phase2State() if start is None else replace(start, history=list(start.history))
    if start is not None:
        module.load_state_dict(start.model, strict=False)
        optimizer.load_state_dict(start.optimizer)
        if start.rng is not None:
            torch.set_rng_state(start.rng)
    batch_size = resolve_batch(settings.batch_size, model, runner)
    batches = _spans(range(train.positions), batch_size)
    progress.start("phase2", settings.epochs)

    for epoch in range(state.epoch + 1, settings.epochs + 1):
        if state.counter >= settings.patience:
            break  # resumed from the checkpoint of the epoch that decided to stop
        started = time.perf_counter()
        module.train()
        train_nll = 0.0
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            part = runner.shard(len(batch))  # this rank's slice of the global batch: all ranks step together
            mine = range(batch.start + part.start, batch.start + part.stop)
            batch_nll, _ = _pass(model, train, mine, runner, settings.ce_chunk, grad_scale=1 / len(batch))
            batch_nll = _sum_over_ranks(params, batch_nll, runner)
            if not math.isfinite(batch_nll):
                raise RunFailed(f"phase 2, epoch {epoch}, batch {step}: non-finite loss {batch_nll}; lower "
                                f"phase2.learning_rate or check the contexts for NaN/inf")
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            train_nll += batch_nll

        outputs = evaluate(model, val, settings, runner)
        val_loss = outputs.nll_sum / outputs.count
        if not math.isfinite(val_loss):
            raise RunFailed(f"phase 2, epoch {epoch}: non-finite validation loss {val_loss}")
        decision = early_stop_update(state.best_val_loss, state.counter, val_loss, settings.patience)
        train_loss = train_nll / train.positions
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "train_loss": train_loss, "train_ppl": _ppl(train_loss), "val_loss": val_loss,
               "val_ppl": _ppl(val_loss), "val_acc": outputs.correct / outputs.count, "seconds": seconds}
        state.history.append(row)
        state.epoch, state.counter, state.best_val_loss = epoch, decision.counter, decision.best
        state.seconds += seconds
        if decision.improved:
            state.best_epoch, state.best_val = epoch, outputs
            state.best_weights = _trainable(module, params) if settings.restore_best else {}
        progress.advance("phase2", **row)
        if on_epoch_end is not None:
            on_epoch_end(replace(state, history=list(state.history), model=_trainable(module, params),
                                 optimizer=copy.deepcopy(optimizer.state_dict()), rng=torch.get_rng_state()))
        if decision.stop:
            break

    progress.finish("phase2")
    if settings.restore_best and state.best_weights:
        module.load_state_dict(state.best_weights, strict=False)
    assert state.best_val is not None, "phase 2 ran no epoch"
    return Phase2Report(best_epoch=state.best_epoch, epochs_run=state.epoch, history=list(state.history),
                        val=replace(state.best_val), seconds=state.seconds, batch_size=batch_size)
