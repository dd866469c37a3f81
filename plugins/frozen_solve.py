"""Contexts of a frozen ContextBlock for a whole stream, as a sequential rollout gives them.

The rollout c_i = F(c_{i−1}, x_i), c_{−1} = 0, is the fixed point of the shifted parallel update
C ← F(shift(C), X), so it need not be a batch-1 loop (spec §7 item 8: 627 s on an L4):

* ``sequential``: the batch-1 loop itself, with the token half precomputed once. The reference.
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
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from newllm_kit.protocols import SolveResult

METHODS = ("auto", "sequential", "jacobi", "chunked")
JACOBI_BATCH = 8192  # rows per Jacobi forward: bounds activation memory, large enough for full GEMM speed
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


def rollout(block: Any, projected: torch.Tensor, width: int, keep_all: bool = True) -> list[torch.Tensor]:
    """The batch-1 sequential loop: position 0 from a zero context, each next one from the last output."""
    n = projected.shape[0]
    context = projected.new_zeros(1, width)
    out: list[torch.Tensor] = []
    for i in range(n):
        layers = block.step(context, projected[i:i + 1])
        kept = layers if keep_all else layers[-1:]
        if not out:
            out = [h.new_empty(n, h.shape[1]) for h in kept]
        for buffer, h in zip(out, kept, strict=True):
            buffer[i] = h[0]
        context = layers[-1]
    return out


def _batched_step(block: Any, contexts: torch.Tensor, projected: torch.Tensor,
                  keep_all: bool) -> list[torch.Tensor]:
    """F for many positions at once, in row batches of JACOBI_BATCH."""
    pieces = [block.step(contexts[a:a + JACOBI_BATCH], projected[a:a + JACOBI_BATCH])
              for a in range(0, contexts.shape[0], JACOBI_BATCH)]
    kept = [p if keep_all else p[-1:] for p in pieces]
    return [torch.cat(layer, dim=0) for layer in zip(*kept, strict=True)]


def jacobi(block: Any, projected: torch.Tensor, width: int, tolerance: float,
           keep_all: bool = True) -> tuple[list[torch.Tensor], int, float]:
    """Shifted sweeps from zero (position 0 always gets the zero context) until the error is below tolerance.

    With r the contraction of the max change Δ per sweep (geometric mean over the last 8 sweeps:
    single ratios are noisy), the remaining error is at most Δ·r/(1 − r); a plain Δ < tolerance
    can leave several times more when ρ is near 1. Once Δ stops shrinking (r ≥ 1: the fp32
    rounding floor, or no contraction) Δ < tolerance has to do; n + 1 sweeps are exact anyway.
    """
    n = projected.shape[0]
    last = projected.new_zeros(n, width)
    zero = projected.new_zeros(1, width)
    layers: list[torch.Tensor] = []
    changes: list[float] = []
    while len(changes) <= n:  # sweep n + 1 changes nothing: the rollout is exact
        layers = _batched_step(block, torch.cat([zero, last[:-1]]), projected, keep_all)
        changes.append((layers[-1] - last).abs().max().item())
        last, change = layers[-1], changes[-1]
        if change == 0:
            break
        if len(changes) > 1 and change < tolerance:
            back = min(8, len(changes) - 1)
            ratio = (change / changes[-1 - back]) ** (1 / back) if changes[-1 - back] > 0 else 0.0
            if ratio >= 1 or change * ratio / (1 - ratio) < tolerance:
                break
    return layers, len(changes), changes[-1]


def chunked(block: Any, projected: torch.Tensor, width: int, window: int, chunk: int, tolerance: float,
            keep_all: bool = True) -> tuple[list[torch.Tensor], int, float] | None:
    """Burn-in scan: every chunk starts `window` tokens early from zero; all roll forward as one batch.

    Then every chunk's row runs on into the next chunk, where its history is longer than that
    chunk's own burn-in, overwriting the stored contexts until the two agree (every layer) within
    tolerance/2, or within tolerance after SETTLE steps (fp32 rounding alone keeps two rollouts of
    a trained block ~1e-5 apart). The first gap measures each chunk's burn-in error; the run-on
    repairs chunks where the gain was underestimated. Returns (layers, F evaluations, largest
    first gap), or None when a row runs on for another window + chunk tokens without agreeing.
    """
    n = projected.shape[0]
    chunks = -(-n // chunk)
    starts = (torch.arange(chunks) * chunk - window).to(projected.device)
    context = projected.new_zeros(chunks, width)
    out: list[torch.Tensor] = []
    for t in range(window + chunk):
        position = starts + t
        context = torch.where((position >= 1).unsqueeze(1), context, 0.0)  # position 0 and the pad read zeros
        layers = block.step(context, projected[position.clamp(0, n - 1)])
        context = layers[-1]
        kept = layers if keep_all else layers[-1:]
        if not out:
            out = [h.new_empty(chunks * chunk, h.shape[1]) for h in kept]
        if t >= window:
            for buffer, h in zip(out, kept, strict=True):
                buffer.view(chunks, chunk, -1)[:, t - window] = h
    evaluations, first_gap = chunks * (window + chunk), 0.0
    position, context = starts[:-1] + window + chunk, context[:-1]  # each row's first token of the next chunk
    for t in range(window + chunk + 1):
        inside = position < n
        position, context = position[inside], context[inside]
        if position.numel() == 0:
            return [b[:n] for b in out], evaluations, first_gap
        if t == window + chunk:
            return None
        layers = block.step(context, projected[position])
        context, evaluations = layers[-1], evaluations + position.numel()
        kept = layers if keep_all else layers[-1:]
        gap = torch.stack([(h - b[position]).abs().amax(dim=1) for h, b in zip(kept, out, strict=True)]).amax(0)
        first_gap = max(first_gap, gap.max().item()) if t == 0 else first_gap
        for buffer, h in zip(out, kept, strict=True):
            buffer[position] = h
        # Half the tolerance leaves room for the stored tokens after this one; after SETTLE steps
        # the stored burn-in is long enough that what is left is rounding, so the tolerance will do.
        moving = gap >= (tolerance if t >= SETTLE else tolerance / 2)
        position, context = position[moving] + 1, context[moving]
    return None


def estimate_gain(block: Any, projected: torch.Tensor, width: int, windows: int = 8, warmup: int = 16,
                  steps: int = 32) -> Gain:
    """ρ by power iteration on finite differences along the real stream.

    In `windows` places, roll a context and a copy perturbed by 0.1 % of its norm; each step the
    perturbation's growth is recorded and it is renormalised (so it aligns with the most slowly
    contracting direction). ρ = geometric-mean growth over the last 3/4 of the steps, worst window.
    """
    n = projected.shape[0]
    starts = torch.linspace(0, max(n - warmup - steps, 0), windows).round().long().unique()
    starts = starts.to(projected.device)
    rows = starts.shape[0]
    context = projected.new_zeros(rows, width)
    for t in range(warmup):
        context = block.step(context, projected[(starts + t).clamp(max=n - 1)])[-1]
    generator = torch.Generator().manual_seed(0)  # private: the caller's RNG stream is untouched
    direction = torch.randn(rows, width, generator=generator).to(projected)
    size = 1e-3 * context.norm(dim=1, keepdim=True).clamp_min(1e-3)
    delta = direction * (size / direction.norm(dim=1, keepdim=True))
    scale = context.norm(dim=1).max().item()
    logs = []
    for t in range(warmup, warmup + steps):
        x = projected[(starts + t).clamp(max=n - 1)]
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
    n·(1 + W/Lc), and it cannot check each chunk's error the way chunked does.
    """
    cost = COSTS.get(device.type, COSTS["cuda"])
    params = list(block.parameters())
    fixed = cost.overhead_s + sum(p.numel() * p.element_size() for p in params) / cost.bytes_per_s
    per_row = 2 * sum(p.numel() for p in params) / cost.flops_per_s

    def step(rows: int) -> float:
        return fixed + rows * per_row

    modelled = {"sequential": n * step(1)}
    best_chunk, best = 0, math.inf
    chunk = 2
    while chunk < n:  # a single chunk would just be the sequential rollout
        seconds = (window + chunk + 1) * step(-(-n // chunk))
        if seconds < best:
            best_chunk, best = chunk, seconds
        chunk = math.ceil(chunk * 1.25)
    if best_chunk:
        modelled["chunked"] = best
    method = min(modelled, key=lambda m: modelled[m])
    return method, best_chunk, modelled


def solve_frozen(block: Any, projected: torch.Tensor, width: int, method: str, tolerance: float,
                 keep_all: bool = True) -> SolveResult:
    """Per-layer contexts of every position (only the last layer unless keep_all); no grad, no noise."""
    if method not in METHODS:
        raise ValueError(f"unknown solve method {method!r}; choose one of {', '.join(METHODS)}")
    started = time.perf_counter()
    n = projected.shape[0]
    if n == 0:
        raise ValueError("cannot solve an empty stream")
    extra: dict[str, Any] = {}
    gain: Gain | None = None
    evaluations = window = chunk = 0
    if method == "auto" and n < MIN_AUTO_TOKENS:
        method, extra["reason"] = "sequential", f"stream shorter than {MIN_AUTO_TOKENS} tokens"
    # Jacobi needs the gain too: on a block that does not contract it would sweep n times (n² work)
    # to reach what one sequential pass gives.
    if method in ("auto", "chunked") or (method == "jacobi" and n >= MIN_AUTO_TOKENS):
        gain = estimate_gain(block, projected, width)
        evaluations += gain.evaluations
        extra["scale"] = gain.scale
        if not gain.gain < 1:
            extra["warning"] = (f"the ContextBlock does not contract (measured gain {gain.gain:.3g} >= 1): "
                                f"no parallel solve converges, falling back to the sequential rollout")
            warnings.warn(extra["warning"], RuntimeWarning, stacklevel=3)
            method = "sequential"
        elif method != "jacobi":
            window = burn_in(gain, tolerance)
            chosen, chunk, modelled = plan(block, n, window, projected.device)
            extra["modelled_seconds"] = modelled
            method = chosen if method == "auto" else ("chunked" if chunk else "sequential")
    if method == "chunked":
        solved = chunked(block, projected, width, window, chunk, tolerance, keep_all)
        if solved is not None:
            layers, used, gap = solved
            extra.update(window=window, chunk=chunk, burn_in_error=gap)
            return SolveResult(layers, "chunked", window + chunk, evaluations + used,
                               time.perf_counter() - started, gap, gain.gain if gain else None, extra)
        extra["warning"] = "neighbouring chunks did not agree: using the sequential rollout"
        warnings.warn(extra["warning"], RuntimeWarning, stacklevel=2)
        method = "sequential"
    if method == "jacobi":
        layers, sweeps, change = jacobi(block, projected, width, tolerance, keep_all)
        return SolveResult(layers, "jacobi", sweeps, evaluations + sweeps * n, time.perf_counter() - started,
                           change, gain.gain if gain else None, extra)
    layers = rollout(block, projected, width, keep_all)
    return SolveResult(layers, "sequential", n, evaluations + n, time.perf_counter() - started, None,
                       gain.gain if gain else None, extra)
