"""Contexts of a frozen ContextBlock for a whole stream, as a sequential rollout gives them.

The rollout c_i = F(c_{i−1}, x_i), c_{−1} = 0, is the fixed point of the shifted parallel update
C ← F(shift(C), X), so it need not be a batch-1 loop (spec §7 item 8: 627 s on an L4):

* ``sequential``: the batch-1 loop itself. The reference.
* ``jacobi``: sweeps of the shifted update from zero contexts. After s sweeps position i holds
  the rollout started s tokens earlier from a zero context, so the error falls like ρ^s (ρ the
  block's per-token contraction gain); it is exact after n sweeps, which caps it.
* ``chunked``: cut the stream into chunks of Lc tokens, start each W tokens early from a zero
  context and roll all chunks forward together as one batch: n·(1 + W/Lc) evaluations instead
  of Jacobi's ≈ W·n, for the same error ρ^W. Each chunk's row then runs on into the next chunk
  until the two agree, which measures every chunk's error and repairs it where ρ was
  underestimated.
* ``auto``: measure ρ, pick W with ρ^W · scale ≤ tolerance/4, then chunked (with the chunk
  length of lowest modelled cost) or sequential, whichever the cost model says is faster;
  sequential with a warning when the block does not contract (ρ ≥ 1). An explicit ``jacobi``
  measures ρ too (streams of ``MIN_AUTO_TOKENS`` or more) and falls back the same way.

Every method keeps one context per position, the final layer's c_i = h_L(i) (a position's
per-layer contexts are one batched `step` from c_{i−1}, recomputed by whoever needs them), and
projects the token inputs from the ids a block at a time: no [n, P] or per-layer tensor of the
whole stream exists. The [n, C] result may live anywhere (device, pinned host memory, a
memory-mapped file) in fp32 or bf16; the arithmetic stays fp32 on the ids' device.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .contract import SolveResult
from .row_map import RowMap
from .spans import token_rows, token_span

METHODS = ("auto", "sequential", "jacobi", "chunked")
BLOCK = 8192  # rows per batched forward or token projection: bounds memory, large enough for full GEMM speed
MIN_AUTO_TOKENS = 256  # below this the gain estimate costs about as much as the rollout
SETTLE = 8  # run-on steps after which a chunk only has to agree within the tolerance


@dataclass(frozen=True)
class Gain:
    """Per-token contraction gain ρ (worst sampled window) and the largest context norm seen."""

    gain: float
    scale: float
    evaluations: int


@dataclass(frozen=True)
class DeviceCost:
    """Order-of-magnitude costs of one `step` call: fixed overhead, weight traffic, arithmetic."""

    overhead_s: float
    bytes_per_s: float
    flops_per_s: float


# Deterministic on purpose: timing the machine would let the method (and the last bits of the
# result) change from run to run. Only ratios matter and the alternatives differ by large factors.
COSTS = {"cpu": DeviceCost(1e-4, 2e10, 2e11), "cuda": DeviceCost(3e-4, 2e12, 3e13)}


@contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32: a 1e-5 tolerance is meaningless at TF32's ~1e-3 precision."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class Tokens:
    """A stream's projected token inputs, computed from its ids on demand (a span or a gather)."""

    def __init__(self, model: Any, ids: torch.Tensor) -> None:
        self.model, self.ids, self.block = model, ids, model.context_block

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def span(self, start: int, stop: int) -> torch.Tensor:
        return self.block.project_tokens(token_span(self.model, self.ids, start, stop))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.block.project_tokens(token_rows(self.model, self.ids, positions))


class RolloutProgress(Protocol):
    """Where a sequential rollout resumes, and what it reports as it goes (`solve_checkpoint`)."""

    def resumed(self) -> tuple[int, torch.Tensor | None]:
        """(position, carried context) to continue from, the rows before it already in `out`; (0, None)."""
        ...

    def reached(self, position: int, context: torch.Tensor, out: torch.Tensor) -> None:
        """Every held row before `position` is final in `out`; `context` is c_{position − 1}."""
        ...


def rollout(block: Any, tokens: Tokens, out: torch.Tensor, where: RowMap,
            progress: RolloutProgress | None = None) -> None:
    """The batch-1 loop from a zero context at position 0 through the whole stream; the rows `where`
    holds land in `out`. Tokens are projected BLOCK at a time, and each block is copied out at once.
    Every rank of a ddp job rolls the whole stream, whichever rows it keeps, so all of them reach
    the next collective together. `progress` resumes the loop and hears of every block."""
    n, width = len(tokens), out.shape[1]
    start, context = (0, None) if progress is None else progress.resumed()
    for a in range(start, n, BLOCK):
        b = min(a + BLOCK, n)
        projected = tokens.span(a, b)
        context = projected.new_zeros(1, width) if context is None else context.to(projected)
        rows = projected.new_empty(b - a, width)
        for i in range(b - a):
            context = block.step(context, projected[i:i + 1])[-1]
            rows[i] = context[0]
        for lo, hi, at in where.pieces(a, b):
            out[at:at + hi - lo].copy_(rows[lo - a:hi - a])
        if progress is not None:
            progress.reached(b, context, out)


def jacobi(block: Any, tokens: Tokens, out: torch.Tensor, where: RowMap, tolerance: float) -> tuple[int, float]:
    """Shifted sweeps from zero (position 0 always gets the zero context) until the error is below tolerance.

    Each sweep overwrites the contexts block by block, after reading them and keeping the previous
    value of the block's last row for the next block's first input, so it needs no second copy.
    With r the contraction of the max change Δ per sweep (geometric mean over the last 8 sweeps:
    single ratios are noisy), the remaining error is at most Δ·r/(1 − r); a plain Δ < tolerance
    can leave several times more when ρ is near 1. Once Δ stops shrinking (r ≥ 1: the fp32
    rounding floor, or no contraction) Δ < tolerance has to do; n + 1 sweeps are exact anyway.
    Sweeps run on a whole-stream fp32 copy when `out` is narrower or holds only some rows.
    """
    stop, width, device = len(tokens), out.shape[1], tokens.ids.device
    direct = where.is_whole and out.dtype == torch.float32
    work = out.zero_() if direct else torch.zeros(stop, width, device=out.device)
    changes: list[float] = []
    while len(changes) <= stop:  # sweep n + 1 changes nothing: the rollout is exact
        carry = torch.zeros(1, width, device=device)
        largest = torch.zeros((), device=device)
        for a in range(0, stop, BLOCK):
            b = min(a + BLOCK, stop)
            previous = work[a:b].to(device)
            new = block.step(torch.cat([carry, previous[:-1]]), tokens.span(a, b))[-1]
            largest = torch.maximum(largest, (new - previous).abs().max())
            carry = previous[-1:].clone()
            work[a:b].copy_(new)
        changes.append(largest.item())
        change = changes[-1]
        if change == 0:
            break
        if len(changes) > 1 and change < tolerance:
            back = min(8, len(changes) - 1)
            ratio = (change / changes[-1 - back]) ** (1 / back) if changes[-1 - back] > 0 else 0.0
            if ratio >= 1 or change * ratio / (1 - ratio) < tolerance:
                break
    if not direct:
        for lo, hi, at in where.pieces(0, stop):
            out[at:at + hi - lo].copy_(work[lo:hi])
    return len(changes), changes[-1]


def _write(out: torch.Tensor, where: RowMap, positions: torch.Tensor, contexts: torch.Tensor) -> None:
    """The context of every position that `out` holds, in its local row (the rest are dropped)."""
    rows = where.local_index(positions)
    kept = rows >= 0
    out.index_copy_(0, rows[kept].to(out.device), contexts[kept].to(out.device, out.dtype))


def chunked(block: Any, tokens: Tokens, out: torch.Tensor, where: RowMap, window: int, chunk: int,
            tolerance: float) -> tuple[int, float] | None:
    """Burn-in scan: every chunk starts `window` tokens early from zero; all roll forward as one batch.

    Then every chunk's row runs on into the next chunk, where its history is longer than that
    chunk's own burn-in, overwriting the stored contexts until the two agree within tolerance/2,
    or within tolerance after SETTLE steps (fp32 rounding alone keeps two rollouts of a trained
    block ~1e-5 apart); a narrower `out` widens that by its own rounding. The first gap measures
    each chunk's burn-in error; the run-on repairs chunks where the gain was underestimated. The
    whole stream is scanned whichever rows `out` holds, so every rank of a ddp job does one
    process's work and reaches the next collective with the others; a row at a position `out`
    does not hold has nothing stored to agree with and runs on. Returns (F evaluations, largest
    first gap), or None when a row runs on for another window + chunk tokens (plus the longest
    stretch `out` does not hold) without agreeing.
    """
    n, width, device = len(tokens), out.shape[1], tokens.ids.device
    steps = window + chunk
    rows = -(-n // chunk)
    starts = torch.arange(rows, device=device) * chunk - window
    context = torch.zeros(rows, width, device=device)
    per_block = max(1, BLOCK // rows)  # time steps whose tokens are projected together
    for t0 in range(0, steps, per_block):
        positions = starts.unsqueeze(1) + torch.arange(t0, min(t0 + per_block, steps), device=device)
        projected = tokens.at(positions.clamp(0, n - 1).flatten()).view(rows, positions.shape[1], -1)
        kept = []
        for t in range(t0, t0 + positions.shape[1]):
            position = positions[:, t - t0]
            context = torch.where((position >= 1).unsqueeze(1), context, 0.0)  # position 0 and the pad read zeros
            context = block.step(context, projected[:, t - t0])[-1]
            if t >= window:
                kept.append(context)
        if kept:
            _write(out, where, positions[:, -len(kept):], torch.stack(kept, dim=1))
    evaluations, first_gap = rows * steps, 0.0
    slack = 0.0 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps
    if not where.spans:  # this rank holds none of the stream's rows: nothing to check
        return evaluations, first_gap
    position, context = starts[:-1] + steps, context[:-1]  # each row's first token of the next chunk
    first, stop = where.spans[0][0], where.spans[-1][1]  # nothing outside these rows to agree with
    near = position >= first - chunk
    position, context = position[near], context[near]
    longest = steps + where.longest_gap()
    for t in range(longest + 1):
        inside = position < stop
        position, context = position[inside], context[inside]
        if position.numel() == 0:
            return evaluations, first_gap
        if t == longest:
            return None
        context = block.step(context, tokens.at(position))[-1]
        evaluations += position.numel()
        local = where.local_index(position)
        stored = local >= 0
        index = local[stored].to(out.device)
        previous = out[index].to(device, torch.float32)
        gap = torch.full_like(position, math.inf, dtype=context.dtype)
        gap[stored] = (context[stored] - previous).abs().amax(dim=1)
        if t == 0 and previous.shape[0]:
            first_gap = max(first_gap, gap[stored].max().item())
        out.index_copy_(0, index, context[stored].to(out.device, out.dtype))
        # Half the tolerance leaves room for the stored tokens after this one; after SETTLE steps
        # the stored burn-in is long enough that what is left is rounding, so the tolerance will do.
        limit = torch.full_like(gap, tolerance if t >= SETTLE else tolerance / 2)
        limit[stored] += slack * previous.abs().amax(dim=1)
        moving = gap >= limit
        position, context = position[moving] + 1, context[moving]
    return None


def estimate_gain(block: Any, tokens: Tokens, width: int, windows: int = 8, warmup: int = 16,
                  steps: int = 32) -> Gain:
    """ρ by power iteration on finite differences along the real stream.

    In `windows` places, roll a context and a copy perturbed by 0.1 % of its norm; each step the
    perturbation's growth is recorded and it is renormalised (so it aligns with the most slowly
    contracting direction). ρ = geometric-mean growth over the last 3/4 of the steps, worst window.
    """
    n, device = len(tokens), tokens.ids.device
    starts = torch.linspace(0, max(n - warmup - steps, 0), windows).round().long().unique().to(device)
    rows = starts.shape[0]
    positions = (starts.unsqueeze(1) + torch.arange(warmup + steps, device=device)).clamp(max=n - 1)
    projected = tokens.at(positions.flatten()).view(rows, warmup + steps, -1)
    context = projected.new_zeros(rows, width)
    for t in range(warmup):
        context = block.step(context, projected[:, t])[-1]
    generator = torch.Generator().manual_seed(0)  # private: the caller's RNG stream is untouched
    direction = torch.randn(rows, width, generator=generator).to(projected)
    size = 1e-3 * context.norm(dim=1, keepdim=True).clamp_min(1e-3)
    delta = direction * (size / direction.norm(dim=1, keepdim=True))
    scale = context.norm(dim=1).max().item()
    logs = []
    for t in range(warmup, warmup + steps):
        x = projected[:, t]
        both = block.step(torch.cat([context, context + delta]), torch.cat([x, x]))[-1]
        context, diff = both[:rows], both[rows:] - both[:rows]
        norm = diff.norm(dim=1, keepdim=True)
        if t >= warmup + steps // 4:
            logs.append((norm / delta.norm(dim=1, keepdim=True)).log().squeeze(1))
        delta = torch.where(norm > 0, diff * (size / norm.clamp_min(1e-30)), delta)
        scale = max(scale, context.norm(dim=1).max().item())
    gain = torch.stack(logs).mean(0).exp().max().item()
    return Gain(gain if math.isfinite(gain) else math.inf, scale, rows * (warmup + 2 * steps))


def burn_in(gain: Gain, tolerance: float) -> int:
    """W with ρ^W · scale ≤ tolerance / 4 (scale bounds the zero start's error; /4 is margin)."""
    if gain.gain <= 0 or tolerance >= 4 * gain.scale:
        return 1
    return max(1, math.ceil(math.log(tolerance / (4 * gain.scale)) / math.log(gain.gain)))


def plan(block: Any, n: int, window: int, device: torch.device) -> tuple[str, int, dict[str, float]]:
    """Sequential or chunked, by a deterministic cost model: (method, chunk length, modelled seconds).

    Jacobi is never picked: for the same error it needs ≈ W·n evaluations against chunked's
    n·(1 + W/Lc), and it cannot check each chunk's error the way chunked does. Chunks are at least
    n/BLOCK long, so one step's batch (all chunks), and its memory, stays within BLOCK rows.
    """
    cost = COSTS.get(device.type, COSTS["cuda"])
    params = list(block.parameters())
    fixed = cost.overhead_s + sum(p.numel() * p.element_size() for p in params) / cost.bytes_per_s
    per_row = 2 * sum(p.numel() for p in params) / cost.flops_per_s

    def step(rows: int) -> float:
        return fixed + rows * per_row

    modelled = {"sequential": n * step(1)}
    best_chunk, best = 0, math.inf
    chunk = max(2, -(-n // BLOCK))
    while chunk < n:  # a single chunk would just be the sequential rollout
        seconds = (window + chunk + 1) * step(-(-n // chunk))
        if seconds < best:
            best_chunk, best = chunk, seconds
        chunk = math.ceil(chunk * 1.25)
    if best_chunk:
        modelled["chunked"] = best
    method = min(modelled, key=lambda m: modelled[m])
    return method, best_chunk, modelled


def solve_frozen(model: Any, ids: torch.Tensor, method: str, tolerance: float, out: torch.Tensor | None = None,
                 where: RowMap | None = None, progress: RolloutProgress | None = None) -> SolveResult:
    """The final-layer context of every position (no grad, no noise), as `SolveResult.layers == [contexts]`.

    `out` receives the rows `where` holds (default: the whole stream), in its local order (default:
    a new fp32 tensor on the ids' device). Every row's value is the whole stream's, whichever rows
    are kept: ranks that share a stream each write their own. `progress` resumes a sequential
    rollout and hears of its blocks (the parallel methods restart: they take minutes, not hours).
    """
    if method not in METHODS:
        raise ValueError(f"unknown solve method {method!r}; choose one of {', '.join(METHODS)}")
    started = time.perf_counter()
    n, block, width = ids.shape[0], model.context_block, model.context_dim
    if n == 0:
        raise ValueError("cannot solve an empty stream")
    where = RowMap.whole(n) if where is None else where
    out = torch.empty(where.rows, width, device=ids.device) if out is None else out
    tokens = Tokens(model, ids)
    extra: dict[str, Any] = {}
    gain: Gain | None = None
    evaluations = window = chunk = 0
    if method == "auto" and n < MIN_AUTO_TOKENS:
        method, extra["reason"] = "sequential", f"stream shorter than {MIN_AUTO_TOKENS} tokens"
    # Jacobi needs the gain too: on a block that does not contract it would sweep n times (n² work)
    # to reach what one sequential pass gives.
    if method in ("auto", "chunked") or (method == "jacobi" and n >= MIN_AUTO_TOKENS):
        gain = estimate_gain(block, tokens, width)
        evaluations += gain.evaluations
        extra["scale"] = gain.scale
        if not gain.gain < 1:
            extra["warning"] = (f"the ContextBlock does not contract (measured gain {gain.gain:.3g} >= 1): "
                                f"no parallel solve converges, falling back to the sequential rollout")
            warnings.warn(extra["warning"], RuntimeWarning, stacklevel=3)
            method = "sequential"
        elif method != "jacobi":
            window = burn_in(gain, tolerance)
            chosen, chunk, modelled = plan(block, n, window, ids.device)
            extra["modelled_seconds"] = modelled
            method = chosen if method == "auto" else ("chunked" if chunk else "sequential")
    measured = gain.gain if gain else None
    if method == "chunked":
        solved = chunked(block, tokens, out, where, window, chunk, tolerance)
        if solved is not None:
            used, gap = solved
            extra.update(window=window, chunk=chunk, burn_in_error=gap)
            return SolveResult([out], "chunked", window + chunk, evaluations + used,
                               time.perf_counter() - started, gap, measured, extra)
        extra["warning"] = "neighbouring chunks did not agree: using the sequential rollout"
        warnings.warn(extra["warning"], RuntimeWarning, stacklevel=2)
        method = "sequential"
    if method == "jacobi":
        sweeps, change = jacobi(block, tokens, out, where, tolerance)
        return SolveResult([out], "jacobi", sweeps, evaluations + sweeps * n, time.perf_counter() - started,
                           change, measured, extra)
    rollout(block, tokens, out, where, progress)
    return SolveResult([out], "sequential", n, evaluations + n, time.perf_counter() - started, None,
                       measured, extra)
