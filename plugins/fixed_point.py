"""The `cvfp` solver: Phase-1 fixed-point training of the ContextBlock (spec §3) and frozen solves.

Phase 1 alternates one parallel ("Jacobi") pass over the whole stream with one Adam step: every
token's incoming context is the previous pass's output of the token before it (wrap-around at
position 0), plus noise, and the loss pulls each output towards the previous pass's output at
the same position while a diversity term keeps the contexts apart. A pass overwrites one [n, C]
buffer chunk by chunk (`InPlacePass`) and computes each chunk's token inputs from the ids, so
it holds one context per token plus O(chunk). The frozen solves (the contexts Phase 2 reads)
live in `frozen_solve`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.context_store import decide, free_bytes, is_out_of_memory, settings_of
from newllm_kit.errors import RunFailed, UserError
from newllm_kit.protocols import Phase1Report, Progress, Runner, SolveResult
from newllm_kit.spans import token_rows, token_span

from .frozen_solve import BLOCK, full_precision_matmuls, solve_frozen

T = TypeVar("T")
MAX_ITERATIONS = 1_000_000  # each pass sweeps the whole stream: far beyond any real budget
MAX_BATCH = 10**9
NOISE_ROWS = 1024  # positions per noise draw: a fixed grid, so noise depends on the position only
Rows = range | torch.Tensor  # a chunk's local rows: consecutive (cvfp) or the active ones (gradual-decrease)


class CVFPSolverSettings(BaseModel):
    """The `[solver]` keys of `name = "cvfp"`; defaults are the 11/28 v2 / `49da23b` values."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=0.002, gt=0, description="Adam step size (default betas, eps).")
    min_iterations: int = Field(default=5, ge=1, le=MAX_ITERATIONS,
                                description="Passes (iteration 0 included) before a stop.")
    max_iterations: int = Field(default=40, ge=1, le=MAX_ITERATIONS,
                                description="Most passes in total, iteration 0 included.")
    convergence_threshold: float = Field(
        default=0.03, ge=0, description="τ: a token has converged when mean_C (O^k − P^{k−1})² < τ.")
    min_converged_ratio: float = Field(
        default=0.95, ge=0, le=1, description="Stop once this share of tokens has converged.")
    context_noise: float = Field(
        default=0.1, ge=0, description="σ of the Gaussian noise added to the incoming contexts.")
    dist_reg_weight: float = Field(
        default=0.5, ge=0, le=1, description="w: loss = (1 − w)·cvfp + w·diversity.")
    batch_size: int = Field(
        default=8000, ge=1, le=MAX_BATCH,
        description="Phase-1 chunk: tokens per loss (the diversity term depends on it).")
    grad_clip: float = Field(default=1.0, gt=0, description="Global gradient-norm clip before each step.")
    init: Literal["rollout", "random"] = Field(
        default="rollout",
        description="Iteration 0: sequential noise-free rollout (every summary number) or N(0, 0.01²) "
                    "contexts (11/29, b1a2782).")
    loss_scope: Literal["chunk", "stream"] = Field(
        default="chunk",
        description="chunk: per-chunk loss, gradients accumulated (v1/v2); stream: one loss over the whole "
                    "stream (the 11/27 trainer, spec §3.4).")
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="stop: a NaN/Inf loss ends the run (RunFailed); skip: drop that chunk (the original).")
    solve: Literal["auto", "sequential", "jacobi", "chunked"] = Field(
        default="auto",
        description="Frozen rollouts (iteration 0 and the Phase-2 contexts); auto picks the fastest method "
                    "that meets solve_tolerance.")
    solve_tolerance: float = Field(
        default=1e-5, gt=0, description="Max |error| of a frozen solve against the sequential rollout.")


@dataclass
class Sweep:
    """One parallel pass: losses and counts summed over all ranks (the outputs are in the buffer)."""

    loss: float
    cvfp_loss: float
    diversity_loss: float
    converged: int
    tokens: int
    step: bool  # stream scope takes no step after a non-finite loss (spec §3.4)


@dataclass
class GroupLoss:
    """A loss group's statistics from a no-grad forward: what each piece's gradient needs."""

    count: float
    mean: torch.Tensor
    spread: torch.Tensor
    cvfp: torch.Tensor
    diversity: torch.Tensor
    loss: torch.Tensor


def with_oom_retry(runner: Runner, batch: int, work: Callable[[], T], failure: Callable[[], str]) -> T:
    """Call `work` again with the runner's smaller micro-batch after an out-of-memory error.

    `work` must resume where it stopped, not restart (`InPlacePass.run` does). It contains
    collectives, so under ddp every rank must retry together: `oom_on_any_rank` turns one rank's
    OOM into an OOM on all of them at the same point of the sweep. An OOM the runner cannot
    retry ends the run with `failure()`: one line naming the phase, the memory and the setting.
    """
    while True:
        try:
            return work()
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            try:
                retry = runner.handle_oom(error, batch)
            except UserError:  # the runner's own advice names Phase 2's settings
                retry = False
            if not retry:
                raise RunFailed(failure()) from error


def oom_on_any_rank(runner: Runner, compute: Callable[[], T]) -> T:
    """Run collective-free `compute` on every rank; if any rank ran out of memory, all raise it here.

    A rank that retried on its own would re-enter the sweep's collectives out of step with the
    others (mismatched all-reduces, or a hang until runner.timeout_s). Agreeing at this point,
    before the next collective, lets every rank shrink its micro-batch and redo the sweep in step."""
    failure: BaseException | None = None
    result: T | None = None
    try:
        result = compute()
    except (torch.OutOfMemoryError, RuntimeError) as error:  # the CPU allocator raises a RuntimeError
        if not is_out_of_memory(error):
            raise
        failure = error
    if runner.world_size > 1:
        flag = torch.tensor([0.0 if failure is None else 1.0], device=runner.device)
        if runner.all_reduce_sum(flag).item() > 0 and failure is None:
            failure = torch.OutOfMemoryError(f"out of memory on another rank (retrying together on rank "
                                             f"{runner.rank})")
    if failure is not None:
        raise failure
    return cast(T, result)


def noise_seed(seed: int, iteration: int, block: int) -> int:
    """A well-mixed 64-bit seed for one noise block (numpy's SeedSequence does the mixing)."""
    return int(np.random.SeedSequence([seed, iteration, block]).generate_state(1, np.uint64)[0])


def context_noise(positions: torch.Tensor, width: int, sigma: float, seed: int, iteration: int,
                  device: torch.device) -> torch.Tensor:
    """N(0, σ²) for sorted stream positions: block b of NOISE_ROWS positions is drawn whole from a
    generator seeded by (seed, iteration, b), so a position's noise depends on nothing else (not
    the chunking, micro-batch, active set or number of ranks) and no [n, C] draw ever exists."""
    positions = positions.contiguous()
    noise = torch.empty(positions.shape[0], width, device=device)
    blocks = torch.unique_consecutive(positions // NOISE_ROWS)
    bounds = [*torch.searchsorted(positions, blocks * NOISE_ROWS).tolist(), positions.shape[0]]
    for block, lo, hi in zip(blocks.tolist(), bounds, bounds[1:], strict=False):
        generator = torch.Generator(device).manual_seed(noise_seed(seed, iteration, block))
        draw = torch.randn(NOISE_ROWS, width, generator=generator, device=device)
        first, last = int(positions[lo]) - block * NOISE_ROWS, int(positions[hi - 1]) - block * NOISE_ROWS
        consecutive = last - first == hi - lo - 1
        noise[lo:hi] = draw[first:last + 1] if consecutive else draw[(positions[lo:hi] - block * NOISE_ROWS).to(device)]
    return noise.mul_(sigma)


def _take(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return tensor[rows.start:rows.stop] if isinstance(rows, range) else tensor[rows.to(tensor.device)]


def _put(tensor: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    if isinstance(rows, range):
        tensor[rows.start:rows.stop] = values.to(tensor.device)
    else:
        tensor[rows.to(tensor.device)] = values.to(tensor.device)


class InPlacePass:
    """One parallel pass (spec §3.2) that overwrites the previous pass's contexts chunk by chunk.

    Row i reads row i−1's previous context (its input) and its own (its target), so a chunk may
    overwrite its rows once it has read them, if the previous context of its last row is kept
    (`carry`) for the next chunk's first input. Work is committed a piece at a time (outputs
    written, gradients added, counts summed), so after an out-of-memory error `run` resumes
    where it stopped instead of redoing rows whose previous contexts are gone.
    """

    def __init__(self, model: Any, ids: torch.Tensor, contexts: torch.Tensor, offset: int, chunks: list[Rows],
                 settings: CVFPSolverSettings, runner: Runner, iteration: int, sigma: float, seed: int,
                 params: list[torch.nn.Parameter], converged: torch.Tensor | None = None) -> None:
        self.model, self.ids, self.contexts, self.offset, self.chunks = model, ids, contexts, offset, chunks
        self.settings, self.runner, self.iteration, self.sigma, self.seed = settings, runner, iteration, sigma, seed
        self.params = [p for p in params if p.requires_grad]
        self.converged = converged  # per-row flags for the caller (gradual-decrease retires on them)
        self.device = runner.device
        # Rank 0 gets the stream's last row (the wrap-around), every other rank its neighbour's.
        self.carry = runner.neighbour_exchange(contexts[-1:].to(self.device, copy=True)).to(contexts.device)
        self.carry_row = -1  # the local row whose previous context `carry` holds
        totals = torch.tensor([float(len(chunks)), float(sum(len(rows) for rows in chunks))], device=self.device)
        totals = runner.all_reduce_sum(totals)
        # Chunk losses are scaled by 1/(chunks over all ranks), so summing gradients over ranks
        # gives the unweighted mean of chunk gradients of spec §3.2; the stream has one loss.
        self.scale = 1.0 if settings.loss_scope == "stream" else totals[0].item()
        self.tokens = int(totals[1].item())
        self.done = 0  # chunks finished
        self.rows_done = 0  # rows of chunk `done` finished (pieces path)
        self.group: GroupLoss | None = None
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, cvfp, diversity, bad, converged
        self.first_bad: int | None = None

    def run(self) -> Sweep:
        """Outputs into the buffer and each chunk's gradient into `.grad` (no optimiser step)."""
        s = self.settings
        if s.loss_scope == "stream":
            # The stream's collectives sit inside `_pieces`, which agrees on OOMs around them.
            self._pieces(self.chunks[0], self.runner.micro_batch(s.batch_size), stream=True)
            self.done = 1
        else:
            oom_on_any_rank(self.runner, self._chunk_loop)
        sums = self.runner.all_reduce_sum(self.sums)
        if sums[3] > 0 and s.nonfinite == "stop":
            first_bad, runner = self.first_bad, self.runner
            where = f"chunk {first_bad}" if first_bad is not None else "a chunk on another rank"
            if runner.world_size > 1 and first_bad is not None:
                where += f" of rank {runner.rank}"
            raise RunFailed(f"phase 1: non-finite loss at iteration {self.iteration}, {where}; lower "
                            f"solver.learning_rate, or set solver.nonfinite = \"skip\" to drop such chunks "
                            f"as the original did")
        loss, cvfp, diversity = (sums[:3] / max(self.tokens, 1)).tolist()
        stream = s.loss_scope == "stream"
        return Sweep(loss, cvfp, diversity, int(sums[4]), self.tokens, not (stream and sums[3] > 0))

    def _chunk_loop(self) -> None:
        micro = self.runner.micro_batch(self.settings.batch_size)
        while self.done < len(self.chunks):
            rows = self.chunks[self.done]
            if self.group is None and len(rows) <= micro:
                self._whole(rows)
            else:
                self._pieces(rows, micro, stream=False)
            self.done, self.rows_done, self.group = self.done + 1, 0, None

    def _inputs(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token inputs, noisy incoming contexts and targets of some rows, on the runner's device."""
        first = rows.start if isinstance(rows, range) else int(rows[0])
        with torch.no_grad():
            if isinstance(rows, range):
                x = token_span(self.model, self.ids, self.offset + rows.start, self.offset + rows.stop)
                before = self.carry if first - 1 == self.carry_row else self.contexts[first - 1:first]
                incoming = torch.cat([before, self.contexts[first:rows.stop - 1]])
                positions = torch.arange(self.offset + rows.start, self.offset + rows.stop)
            else:
                x = token_rows(self.model, self.ids, (rows + self.offset).to(self.ids.device))
                incoming = self.contexts[(rows - 1).clamp(min=0).to(self.contexts.device)]
                if first - 1 == self.carry_row:
                    incoming[0] = self.carry[0]
                positions = rows.cpu() + self.offset
        incoming = incoming.to(self.device)
        if self.sigma > 0:
            incoming = incoming + context_noise(positions, incoming.shape[1], self.sigma, self.seed, self.iteration,
                                                self.device)
        return x, incoming, _take(self.contexts, rows).to(self.device)

    def _forward(self, x: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
        block = self.model.context_block
        with self.runner.autocast():
            return cast(torch.Tensor, block.step(incoming, block.project_tokens(x))[-1].float())

    def _commit(self, rows: Rows, out: torch.Tensor, target: torch.Tensor,
                grads: tuple[torch.Tensor | None, ...] | None) -> None:
        """Add a piece's gradients, overwrite its rows (keeping the last one's previous context) and
        count its converged tokens: nothing here can run out of memory halfway."""
        for p, g in zip(self.params, grads or (), strict=False):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        last = rows.stop - 1 if isinstance(rows, range) else int(rows[-1])
        self.carry, self.carry_row = self.contexts[last:last + 1].clone(), last
        converged = (out - target).pow(2).mean(1) < self.settings.convergence_threshold  # NaN: not converged
        _put(self.contexts, rows, out)
        self.sums[4] += converged.sum().to(self.sums)
        if self.converged is not None:
            _put(self.converged, rows, converged)

    def _tally(self, loss: torch.Tensor, cvfp: torch.Tensor, diversity: torch.Tensor, rows: int) -> None:
        finite = bool(torch.isfinite(loss))
        if not finite and self.first_bad is None:
            self.first_bad = self.done
        parts = [loss * rows, cvfp * rows, diversity * rows, torch.tensor(float(not finite))]
        self.sums[:4] += torch.stack([t.detach().double().to(self.device) for t in parts])

    def _whole(self, rows: Rows) -> None:
        """A chunk in one forward and one backward (the usual case)."""
        x, incoming, target = self._inputs(rows)
        out = self._forward(x, incoming)
        cvfp = (out - target).pow(2).mean(1).mean()
        diversity = -(out - out.mean(0)).norm() / len(rows)
        w = self.settings.dist_reg_weight
        loss = (1 - w) * cvfp + w * diversity
        grads = (torch.autograd.grad(loss / self.scale, self.params, allow_unused=True)
                 if torch.isfinite(loss) else None)
        self._commit(rows, out.detach(), target, grads)
        self._tally(loss, cvfp, diversity, len(rows))

    def _pieces(self, rows: Rows, micro: int, stream: bool) -> None:
        """The same loss and gradient as one piece, in micro-batches (or over all ranks: the stream).

        The diversity term couples rows only through the group mean μ and norm N = ‖O − μ‖_F, and
        its gradient for row i is −(O_i − μ)/(N·m). So a no-grad pass gets μ, N and the CVFP loss,
        and each piece then back-propagates a surrogate with exactly that gradient. Costs one
        extra forward.
        """
        guard: Callable[[Callable[[], Any]], Any] = ((lambda f: oom_on_any_rank(self.runner, f)) if stream
                                                     else (lambda f: f()))
        if self.group is None:
            sums, out = guard(lambda: self._statistics(rows, micro, keep=not stream))
            self.group = self._group_loss(self.runner.all_reduce_sum(sums) if stream else sums, out)
        group, w, width = self.group, self.settings.dist_reg_weight, self.contexts.shape[1]
        finite = bool(torch.isfinite(group.loss))

        def backward() -> None:
            while self.rows_done < len(rows):
                piece = rows[self.rows_done:self.rows_done + micro]
                x, incoming, target = self._inputs(piece)
                grads = None
                with torch.set_grad_enabled(finite):
                    o = self._forward(x, incoming)
                    if finite:
                        surrogate = ((1 - w) * (o - target).pow(2).sum() / (group.count * width)
                                     - w * (o * (o.detach() - group.mean)).sum() / (group.spread * group.count))
                        grads = torch.autograd.grad(surrogate / self.scale, self.params, allow_unused=True)
                self._commit(piece, o.detach(), target, grads)
                self.rows_done += len(piece)

        guard(backward)
        self._tally(group.loss, group.cvfp, group.diversity, len(rows))

    def _statistics(self, rows: Rows, micro: int, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A no-grad forward that writes nothing: float64 [Σ o (C values), Σ ‖o‖², Σ per-token CVFP,
        rows], and the outputs themselves if `keep` (a chunk's: O(chunk)).

        Σ ‖o‖² is summed as Σ_pieces (‖o − μ_p‖² + m_p·‖μ_p‖²) around each piece's mean μ_p, so the
        spread loses nothing to cancellation; a stream too long to keep gets its spread from it."""
        width = self.contexts.shape[1]
        sums = torch.zeros(width + 3, dtype=torch.float64, device=self.device)
        kept = []
        with torch.no_grad():
            for a in range(0, len(rows), micro):
                x, incoming, target = self._inputs(rows[a:a + micro])
                out = self._forward(x, incoming)
                total = out.sum(0)
                sums[:width] += total.double()
                sums[width] += (out - total / out.shape[0]).pow(2).sum().double()
                sums[width] += total.double().pow(2).sum() / out.shape[0]
                sums[width + 1] += (out - target).pow(2).mean(1).double().sum()
                sums[width + 2] += out.shape[0]
                kept += [out] if keep else []
        return sums, torch.cat(kept) if kept else None

    def _group_loss(self, sums: torch.Tensor, out: torch.Tensor | None) -> GroupLoss:
        """μ, N and the losses; from the kept outputs in fp32 where there are any (a chunk's loss is
        then exactly its one-piece value), else from the sums."""
        width, w = self.contexts.shape[1], self.settings.dist_reg_weight
        count = sums[width + 2].item()
        if out is not None:
            mean = out.sum(0) / count
            spread = (out - mean).pow(2).sum().sqrt()
        else:
            mean = (sums[:width] / count).float()
            spread = (sums[width] - count * mean.double().pow(2).sum()).clamp(min=0).float().sqrt()
        cvfp = (sums[width + 1] / count).float()
        diversity = -spread / count
        return GroupLoss(count, mean, spread, cvfp, diversity, (1 - w) * cvfp + w * diversity)


def stream_shard(n: int, settings: CVFPSolverSettings, runner: Runner) -> range:
    """This rank's rows of the stream, cut at chunk boundaries.

    Whole chunks per rank keep every chunk's loss (the diversity term depends on its rows) the
    same as in one process, so a sharded run takes the same optimiser steps. The stream scope has
    one global loss and is cut by position. Every rank must own rows: neighbour_exchange needs one.
    """
    if runner.world_size == 1:
        return range(n)
    if settings.loss_scope == "stream":
        rows = runner.shard(n)
    else:
        size = settings.batch_size
        chunks = runner.shard(-(-n // size))
        rows = range(min(chunks.start * size, n), min(chunks.stop * size, n))
    if len(rows) == 0:
        raise UserError(f"phase 1: {n} tokens in chunks of solver.batch_size = {settings.batch_size} leave rank "
                        f"{runner.rank} of {runner.world_size} without work; lower solver.batch_size to at "
                        f"most {max(n // runner.world_size, 1)} or start fewer processes")
    return rows


def gather_rows(local: torch.Tensor, rows: range, n: int, runner: Runner) -> torch.Tensor:
    """The whole stream's rows on every rank, where `local` lives: sums of zero-padded shards (exact),
    BLOCK rows per collective on the runner's device."""
    if runner.world_size == 1:
        return local
    full = local.new_empty(n, *local.shape[1:])
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        piece = torch.zeros(b - a, *local.shape[1:], dtype=local.dtype, device=runner.device)
        lo, hi = max(a, rows.start), min(b, rows.stop)
        if lo < hi:
            piece[lo - a:hi - a] = local[lo - rows.start:hi - rows.start].to(runner.device)
        full[a:b] = runner.all_reduce_sum(piece).to(full.device)
    return full


def reduce_gradients(params: list[torch.nn.Parameter], runner: Runner) -> None:
    """Sum gradients over ranks in one collective (losses are already scaled to a global mean)."""
    if runner.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = runner.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p)


def _row_bytes(model: Any) -> int:
    """Rough fp32 bytes per token of one Phase-1 forward and backward (inputs, every layer's activations)."""
    widths = getattr(model, "layer_widths", (model.context_dim,))
    return 4 * (int(getattr(model, "token_width", 0)) + 2 * model.context_dim + 3 * sum(widths))


def phase1_oom(model: Any, contexts: torch.Tensor, batch: int, runner: Runner) -> str:
    """The one-line failure of a Phase-1 pass that ran out of memory and cannot be retried."""
    micro, rows = runner.micro_batch(batch), contexts.shape[0]
    held, chunk = rows * model.context_dim * 4, micro * _row_bytes(model)
    store = (' or runner.context_store = "host" to keep the contexts off the device'
             if contexts.device == runner.device and runner.device.type != "cpu" else "")
    return (f"phase 1: out of memory on {runner.device} (estimated {(held + chunk) / 2**30:.2f} GiB: "
            f"{held / 2**30:.2f} GiB of contexts for {rows:,} tokens on {contexts.device} and "
            f"{chunk / 2**30:.2f} GiB per {micro:,}-token chunk); set solver.batch_size = {max(micro // 2, 1)}, "
            f"or runner.auto_batch = true to split chunks automatically{store}")


def solve_oom(model: Any, positions: int, out: torch.Tensor | None, runner: Runner, what: str) -> str:
    """The one-line failure of a frozen solve (or Phase 1's iteration 0) that ran out of memory."""
    contexts = positions * model.context_dim * (4 if out is None else out.element_size())
    work = BLOCK * _row_bytes(model)
    if runner.device.type == "cpu":
        advice = ("Phase 1 keeps its contexts in RAM: use fewer tokens or more memory" if what.startswith("phase 1")
                  else 'set runner.context_store = "disk" to keep them in a memory-mapped file')
    elif out is None or out.device == runner.device:
        advice = 'set runner.context_store = "host" (or "disk") to keep them off the device'
    else:
        advice = "the contexts are off the device already: free device memory"
    return (f"{what}: out of memory on {runner.device} (estimated {(contexts + work) / 2**30:.2f} GiB: "
            f"{contexts / 2**30:.2f} GiB of contexts for {positions:,} positions and {work / 2**30:.2f} GiB "
            f"of working memory); {advice}")


def buffer_device(runner: Runner, rows: int, width: int) -> torch.device:
    """Where Phase 1's contexts live: `runner.context_store` decides as for the Phase-2 stores (auto:
    the device when they fit in memory_fraction of its free memory), in fp32 always; a disk store
    means host memory here. A pass then copies each chunk in and its outputs back."""
    kind, _, fraction = settings_of(runner)
    on_gpu = runner.device.type == "cuda"
    if kind == "auto":
        kind, _ = decide(rows * width * 4, fraction, free_bytes(runner.device) if on_gpu else None, None, on_gpu)
    return runner.device if kind == "device" else torch.device("cpu")


def initial_contexts(model: Any, ids: torch.Tensor, rows: range, settings: CVFPSolverSettings, runner: Runner
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Iteration 0 for this rank's rows, in the one buffer the passes overwrite: the noise-free
    rollout P⁰ (a frozen solve) or N(0, 0.01²) contexts."""
    started = time.perf_counter()
    n, width = ids.shape[0], model.context_dim
    device = buffer_device(runner, len(rows), width)
    pinned = device.type == "cpu" and runner.device.type == "cuda"
    if settings.init == "random":  # drawn for the whole stream on the CPU generator, as in b1a2782
        drawn = torch.randn(n, width) * 0.01
        local = drawn if len(rows) == n else drawn[rows.start:rows.stop].clone()
        local = local.pin_memory() if pinned else local.to(device)
        return local, {"init": "random", "evaluations": 0, "seconds": time.perf_counter() - started}
    try:
        contexts = torch.empty(len(rows), width, device=device, pin_memory=pinned)
        with torch.no_grad(), full_precision_matmuls(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained block rarely contracts: the fallback is the original
            # Every rank solves the same whole stream (the same numbers as one process) but keeps
            # only its rows; a chunked solve scans only the chunks those rows need.
            result = solve_frozen(model, ids, settings.solve, settings.solve_tolerance, out=contexts,
                                  first=rows.start)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise RunFailed(solve_oom(model, len(rows), None, runner, "phase 1, iteration 0 (rollout)")) from error
    # Each rank solved only as far, and (chunked) only as wide, as its rows need: count all ranks' work.
    evaluations = runner.all_reduce_sum(torch.tensor([float(result.token_evaluations)], device=runner.device))
    info = {"init": "rollout", "method": result.method, "gain": result.gain, "evaluations": int(evaluations.item()),
            "contexts_on": str(device), "seconds": time.perf_counter() - started}
    return contexts, info


def consecutive_chunks(rows: int, settings: CVFPSolverSettings) -> list[Rows]:
    """The loss groups of a pass over `rows` local rows: chunks of batch_size, or the whole stream."""
    if settings.loss_scope == "stream":
        return [range(rows)]
    return [range(a, min(a + settings.batch_size, rows)) for a in range(0, rows, settings.batch_size)]


def take_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, runner: Runner,
              settings: CVFPSolverSettings, result: Sweep) -> None:
    """Sum gradients over ranks, clip, and step (unless a stream-scope loss was non-finite)."""
    reduce_gradients(params, runner)
    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    if result.step:
        optimizer.step()


class CVFPSolver:
    """Spec §3 Phase 1 (`fit`) and the frozen contexts of a stream (`solve`)."""

    def __init__(self, settings: CVFPSolverSettings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPSolverSettings()

    def fit(self, model: Any, ids: torch.Tensor, runner: Runner, progress: Progress) -> Phase1Report:
        """Iteration 0, then parallel passes with one Adam step each until the rate or the budget stops."""
        s, started = self.settings, time.perf_counter()
        n, seed = ids.shape[0], torch.initial_seed()  # the experiment seed: the noise derives from it
        rows = stream_shard(n, s, runner)
        params = model.param_groups()["phase1"]
        optimizer = torch.optim.Adam(params, lr=s.learning_rate)
        model.train()
        progress.start("phase1", s.max_iterations)
        contexts, first = initial_contexts(model, ids, rows, s, runner)
        progress.advance("phase1", iteration=0, seconds=first["seconds"])
        evaluations, rate, iterations, history = first["evaluations"], 0.0, 1, []
        chunks = consecutive_chunks(len(rows), s)
        for k in range(1, s.max_iterations):
            tick = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sweep = InPlacePass(model, ids, contexts, rows.start, chunks, s, runner, k, s.context_noise, seed, params)
            result = with_oom_retry(runner, s.batch_size, sweep.run,
                                    lambda: phase1_oom(model, contexts, s.batch_size, runner))
            take_step(params, optimizer, runner, s, result)
            evaluations, iterations = evaluations + n, k + 1
            rate = result.converged / n
            record = {"iteration": float(k), "loss": result.loss, "cvfp_loss": result.cvfp_loss,
                      "diversity_loss": result.diversity_loss, "convergence_rate": rate,
                      "seconds": time.perf_counter() - tick}
            history.append(record)
            progress.advance("phase1", iteration=k, loss=result.loss, cvfp_loss=result.cvfp_loss,
                             diversity_loss=result.diversity_loss, rate=rate, seconds=record["seconds"])
            if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
                break
        progress.finish("phase1")
        return Phase1Report(iterations, rate, n, evaluations, time.perf_counter() - started,
                            gather_rows(contexts, rows, n, runner), history, {"iteration0": first},
                            target_rate=s.min_converged_ratio,
                            converged=iterations >= s.min_iterations and rate >= s.min_converged_ratio)

    def solve(self, model: Any, ids: torch.Tensor, runner: Runner, out: torch.Tensor | None = None) -> SolveResult:
        """The final-layer context of every position, position 0 from a zero context (spec §4.2).

        `out` ([n, C], fp32 or bf16, any device) receives them block by block; without it they
        are a new fp32 tensor on the runner's device.
        """
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), full_precision_matmuls():
                return solve_frozen(model, ids, self.settings.solve, self.settings.solve_tolerance, out)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            raise RunFailed(solve_oom(model, ids.shape[0], out, runner, "frozen solve")) from error
        finally:
            model.train(training)


@hookimpl
def register_solvers(register: Any) -> None:
    register("cvfp", CVFPSolver, settings=CVFPSolverSettings,
             description="CVFP Phase 1 (parallel fixed-point passes, one Adam step each) and frozen solves")
