"""What every recipe's training shares: the chunked head cross-entropy, the epoch loop with early
stopping and resumable state, the micro-batched loss pass, and gradient sums over ranks.

The head's [b, V] logits are what runs out of memory at GPT-2's vocabulary (spec §7.4), so the
loss never holds more than one [chunk, V] block of them. The epoch loop is the reference's
(§4.4): only a strictly lower validation loss resets the patience counter.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda
from .errors import RunFailed
from .protocols import Collectives, EvalOutputs, MemoryPolicy, Progress
from .train_state import TrainState

T = TypeVar("T")


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


@dataclass
class TrainReport:
    best_epoch: int  # 1-based
    epochs_run: int
    history: list[dict[str, float]]
    val: EvalOutputs  # at the best epoch
    seconds: float
    batch_size: int = 0  # items (positions or windows) per step as run ("auto" resolved)
    final_weights: dict[str, torch.Tensor] | None = None  # the last epoch's, where the best epoch's were restored
    ends_on_best: bool = True  # False: the module holds the last epoch's weights, but `val` is an earlier epoch's


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


def spans(rows: range, size: int) -> list[range]:
    """`rows` cut into consecutive pieces of at most `size`."""
    return [range(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, max(size, 1))]


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def trainable_copy(module: nn.Module, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of the trained parameters, by name: a checkpoint must not alias live weights."""
    wanted = {id(p) for p in params}
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters() if id(p) in wanted}


def sum_gradients(params: list[nn.Parameter], runner: Collectives) -> None:
    """Sum gradients over ranks in one collective (each rank's loss is already scaled to a global mean)."""
    if runner.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = runner.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p)


def sum_over_ranks(params: list[nn.Parameter], loss_sum: float, runner: Collectives) -> float:
    """Sum gradients (each rank's already scaled by 1/global batch) and the loss over ranks."""
    if runner.world_size == 1:
        return loss_sum
    sum_gradients(params, runner)
    return float(runner.all_reduce_sum(torch.tensor(loss_sum, dtype=torch.float64, device=runner.device)))


def memory_phase(runner: object, phase: str) -> AbstractContextManager[Any]:
    """The runner's `memory_phase(phase)` block, in which its micro-batch cap is `phase`'s own (a
    halving in Phase 1 leaves Phase 2's and the lm windows' alone); a no-op for a runner without the
    optional member."""
    scope = getattr(runner, "memory_phase", None)
    return contextlib.nullcontext() if scope is None else cast(AbstractContextManager[Any], scope(phase))


def start_unit(runner: object, unit: str) -> None:
    """Tell the runner a unit starts (its micro-batch caps go back to none), if it has the optional member."""
    begin = getattr(runner, "start_unit", None)
    if begin is not None:
        begin(unit)


def retry_after_oom(runner: MemoryPolicy, batch: int, module: nn.Module, attempt: Callable[[], T]) -> T:
    """`attempt()`, retried whole after an out-of-memory error while the runner shrinks its micro-batch
    (`runner.handle_oom`; it raises when it cannot); the failed attempt's partial gradients are dropped."""
    while True:
        try:
            return attempt()
        except torch.OutOfMemoryError as err:
            if not runner.handle_oom(err, batch):
                raise
            module.zero_grad(set_to_none=True)


def loss_pass(module: nn.Module, runner: MemoryPolicy, items: int,
              losses: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], grad_scale: float | None,
              phase: str = "default") -> tuple[float, int]:
    """Summed NLL and top-1 hits over `items` (positions, windows) in the runner's micro-batches.

    `losses(micro)` yields each micro-batch's (summed CE, hits), computed under autocast but yielded
    outside it, so the backward of loss × `grad_scale` (if given) runs as a plain backward would.
    After an OOM the runner may shrink its micro-batch (`phase`'s cap, see `memory_phase`): then the
    whole pass is retried."""
    def attempt() -> tuple[float, int]:
        nll, hits = 0.0, 0
        for loss, correct in losses(runner.micro_batch(items)):
            if grad_scale is not None:
                (loss * grad_scale).backward()
            nll, hits = nll + loss.item(), hits + int(correct.item())
        return nll, hits

    with memory_phase(runner, phase):
        return retry_after_oom(runner, items, module, attempt)


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, loss_sum: float, runner: Collectives,
                   grad_clip: float, where: str, fix: str) -> float:
    """One step after this rank's backward pass: gradients and loss summed over ranks, a non-finite loss
    refused (RunFailed naming `where` and the `fix`), gradients clipped, the optimizer stepped. Returns
    the loss summed over ranks."""
    loss_sum = sum_over_ranks(params, loss_sum, runner)
    if not math.isfinite(loss_sum):
        raise RunFailed(f"{where}: non-finite loss {loss_sum}; {fix}")
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss_sum


def rng_states() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators a training epoch draws from: the CPU's, and the current CUDA device's once CUDA is
    in use (dropout on a GPU draws there), so a resumed run continues bit-identically on either."""
    gpu = cuda.backend()
    state = gpu.get_rng_state() if gpu.is_available() and gpu.is_initialized() else None
    return torch.get_rng_state(), state


def restore_rng(state: TrainState) -> None:
    """Put back what `rng_states` saved. A CUDA state is skipped on a host without CUDA: that run draws
    its dropout on the CPU, whose state is restored, so it continues deterministically, not identically."""
    if state.rng is not None:
        torch.set_rng_state(state.rng)
    if state.cuda_rng is not None and cuda.backend().is_available():
        cuda.backend().set_rng_state(state.cuda_rng)


def train_epochs(module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, *,
                 epochs: int, patience: int, restore_best: bool, phase: str,
                 run_epoch: Callable[[int], tuple[float, int]], evaluate: Callable[[], EvalOutputs],
                 progress: Progress, start: TrainState | None = None,
                 on_epoch_end: Callable[[TrainState], None] | None = None, stream: str = "val") -> TrainReport:
    """The epoch loop every recipe shares (spec §4.4): train, evaluate, early-stop on a strictly lower
    validation loss with `patience`, checkpoint, and end on the best epoch's weights if `restore_best`.

    `run_epoch(epoch)` trains one epoch and returns its summed training NLL and the positions it
    scored; `evaluate()` scores the validation stream. `on_epoch_end` gets a self-contained
    `TrainState` after each epoch; `start=` it to continue bit-identically (weights, optimizer, RNG).
    `stream` names what `evaluate` scores in the logged rows: "val", or "dev" for a development split."""
    state = TrainState() if start is None else replace(start, history=list(start.history))
    if start is not None:
        module.load_state_dict(start.model, strict=False)
        optimizer.load_state_dict(start.optimizer)
        restore_rng(start)
    progress.start(phase, epochs)
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.counter >= patience:
            break  # resumed from the checkpoint of the epoch that decided to stop
        started = time.perf_counter()
        module.train()
        train_nll, positions = run_epoch(epoch)
        outputs = evaluate()
        val_loss = outputs.nll_sum / outputs.count
        if not math.isfinite(val_loss):
            raise RunFailed(f"{phase}, epoch {epoch}: non-finite validation loss {val_loss}")
        decision = early_stop_update(state.best_val_loss, state.counter, val_loss, patience)
        train_loss = train_nll / max(positions, 1)
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "train_loss": train_loss, "train_ppl": ppl(train_loss), f"{stream}_loss": val_loss,
               f"{stream}_ppl": ppl(val_loss), f"{stream}_acc": outputs.correct / outputs.count, "seconds": seconds}
        state.history.append(row)
        state.epoch, state.counter, state.best_val_loss = epoch, decision.counter, decision.best
        state.seconds += seconds
        if decision.improved:
            state.best_epoch, state.best_val = epoch, outputs
            state.best_weights = trainable_copy(module, params) if restore_best else {}
        progress.advance(phase, **row)
        if on_epoch_end is not None:
            rng, cuda_rng = rng_states()
            on_epoch_end(replace(state, history=list(state.history), model=trainable_copy(module, params),
                                 optimizer=copy.deepcopy(optimizer.state_dict()), rng=rng, cuda_rng=cuda_rng))
        if decision.stop:
            break
    progress.finish(phase)
    final = None
    if restore_best and state.best_weights and state.best_epoch != state.epoch:
        final = trainable_copy(module, params)
        module.load_state_dict(state.best_weights, strict=False)
    assert state.best_val is not None, f"{phase} ran no epoch"
    return TrainReport(best_epoch=state.best_epoch, epochs_run=state.epoch, history=list(state.history),
                       val=replace(state.best_val), seconds=state.seconds, final_weights=final,
                       ends_on_best=restore_best or state.best_epoch == state.epoch)
