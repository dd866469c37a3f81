"""One parallel ("Jacobi") pass of Phase 1 over a stream (spec §3.2), in place.

Row i's incoming context is the previous pass's output at row i−1 (plus noise) and its target is
the previous output at row i, so one [n, C] buffer can be overwritten chunk by chunk once each
chunk has read its rows, keeping only the one boundary row the next chunk needs. Token inputs are
computed per chunk from the ids and noise is drawn per block of positions, so a pass holds one
context per token plus O(chunk), and its numbers do not depend on chunking, micro-batch or ranks.
Used by the Phase-1 solvers `cvfp` and `gradual-decrease`, which hand it the few settings it reads
(`PassSettings`), so this module never imports theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import torch

from newllm_kit.errors import RunFailed, UserError
from newllm_kit.protocols import Collectives, MemoryPolicy, Runner
from newllm_kit.training import memory_phase

from .context_store import is_out_of_memory
from .spans import token_rows, token_span

T = TypeVar("T")
NOISE_ROWS = 1024  # positions per noise draw: a fixed grid, so noise depends on the position only
Rows = range | torch.Tensor  # a chunk's local rows: consecutive (cvfp) or the active ones (gradual-decrease)


class PassSettings(Protocol):
    """The Phase-1 settings a pass reads (`phase1.CVFPPhase1Settings` has them, among others)."""

    @property
    def loss_scope(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def nonfinite(self) -> str: ...
    @property
    def convergence_threshold(self) -> float: ...
    @property
    def dist_reg_weight(self) -> float: ...


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


def with_oom_retry(runner: MemoryPolicy, batch: int, work: Callable[[], T], failure: Callable[[], str],
                   phase: str = "default") -> T:
    """Call `work` again with the runner's smaller micro-batch after an out-of-memory error.

    `work` must resume where it stopped, not restart (`InPlacePass.run` does). It contains
    collectives, so under ddp every rank must retry together: `oom_on_any_rank` turns one rank's
    OOM into an OOM on all of them at the same point of the sweep. An OOM the runner cannot
    retry ends the run with `failure()`: one line naming the phase, the memory and the setting.
    The micro-batch cap is `phase`'s own (`newllm_kit.training.memory_phase`).
    """
    with memory_phase(runner, phase):
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


def oom_on_any_rank(runner: Collectives, compute: Callable[[], T]) -> T:
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
                 settings: PassSettings, runner: Runner, iteration: int, sigma: float, seed: int,
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
            fix = ("no step has been taken yet, so the learning rate is not the cause: the embedding table or the "
                   "initial weights hold NaN/inf; check the embedding (embedding.source and its file)"
                   if self.iteration == 1 else "lower solver.learning_rate")
            raise RunFailed(f"phase 1: non-finite loss at iteration {self.iteration}, {where}; {fix}, or set "
                            f"solver.nonfinite = \"skip\" to drop such chunks as the original did")
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
