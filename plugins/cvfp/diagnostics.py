"""The seed's diagnostics of a frozen ContextBlock (spec §3.6 and §5), recorded per unit.

The reference printed these after Phase 1 and acted on one of them (an identity block skipped
Phase 2); a result is easier to trust when they sit next to its PPL. They read only the `Model`
protocol (`context_block.step`, `project_tokens`, `token_inputs`) and context matrices, so they
hold for any CVFP-shaped architecture; the cvfp recipe runs them after the frozen solves.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from newllm_kit.errors import RunFailed

from .contract import SolveResult
from .frozen_solve import full_precision_matmuls
from .solve_checkpoint import TrialsCheckpoint
from .spans import token_span

IDENTITY_PROBES = 100  # the reference's probe count and threshold (spec §3.5, §5)
IDENTITY_THRESHOLD = 0.95
STATS_ROWS = 5_000  # pairwise statistics are O(rows²): the reference sampled at most this many
PAIR_BLOCK = 1_000  # rows per block of the pairwise sums: bounds memory to [block, rows]
ROLLOUT_BLOCK = 8_192  # token inputs projected per block in the validation trials
RANK_TOLERANCE = 1e-6  # actual rank = #(s_k > this)
SPARSE_BELOW = 0.01  # sparsity = share of |values| below this
ZERO_NORM = 0.1  # "zero solution" if the mean row norm is below this
ATTRACTOR_DISTANCE, ATTRACTOR_COSINE = 0.1, 0.99  # "global attractor": every context (nearly) the same
CONVERGENCE_PHASE = "val convergence trials"  # the progress phase of the sequential validation rollouts


@torch.no_grad()
def identity_check(model: Any, seed: int) -> dict[str, Any]:
    """Mean cosine between random probe contexts and the block's output for them (spec §5).

    A block that returns its incoming context ignores the token: its fixed point says nothing
    about the text, which is why the reference stopped before Phase 2 when the mean exceeds 0.95.
    """
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(IDENTITY_PROBES, model.context_dim, generator=generator)
    tokens = torch.randn(IDENTITY_PROBES, model.token_width, generator=generator)
    device = next(model.context_block.parameters()).device
    context, tokens = context.to(device), tokens.to(device)
    block = model.context_block
    out = block.step(context, block.project_tokens(tokens))[-1].float()
    cosine = float(torch.nn.functional.cosine_similarity(context, out, dim=1).mean())
    return {"mean_cosine": cosine, "identity": cosine > IDENTITY_THRESHOLD}


def _slope(losses: list[float]) -> float | None:
    """The slope of a degree-1 fit; None for fewer than two trials, and for a trial whose MSE overflowed
    to inf or NaN (the fit's SVD cannot converge on them)."""
    if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
        return None
    return float(np.polyfit(np.arange(len(losses)), losses, 1)[0])


def classify_trials(losses: list[float]) -> str:
    """The reference's verdict on the trial-to-trial MSE history: slope of a degree-1 fit and std. A
    rollout whose error overflowed (inf or NaN) diverged."""
    if len(losses) < 2:
        return "INSUFFICIENT_DATA"
    slope = _slope(losses)
    if slope is None:
        return "DIVERGING"
    if slope < -0.001:
        return "CONVERGING"
    if abs(slope) < 0.001 and float(np.std(losses)) < 0.01:
        return "CONVERGED"
    if slope > 0.001:
        return "DIVERGING"
    return "UNSTABLE"


@torch.no_grad()
def convergence_check(model: Any, ids: torch.Tensor, trials: int, progress: Any = None,
                      saved: TrialsCheckpoint | None = None) -> dict[str, Any]:
    """`trials` sequential rollouts over the stream, each from the previous one's last context (spec §3.6).

    Trial 1 starts from zero; the token inputs are the same every trial (the history restarts
    from zeros). Once a trial's context equals the previous trial's at some position, the rest
    of the rollout repeats it bit for bit, so the trial stops there and adds no error. A rollout is
    sequential and takes seconds on a long stream, so each trial advances the phase
    `CONVERGENCE_PHASE` of `progress` (a `newllm_kit.protocols.Progress`, or None), and `saved`
    keeps finished trials so a killed unit continues with the next one.
    """
    block, n, width = model.context_block, ids.shape[0], model.context_dim
    device = next(block.parameters()).device
    previous = torch.empty(n, width, device=device)  # the last trial's contexts, overwritten by the next
    start = torch.zeros(1, width, device=device)
    history: list[float] = []  # MSE(trial t, trial t − 1) for t ≥ 2
    done = 0
    if saved is not None and (resumed := saved.resume(previous)) is not None:
        done, history = resumed
        start = previous[-1:].clone()
        if progress is not None:
            progress.message(f"{CONVERGENCE_PHASE}: continuing after trial {done} of {trials} (saved)")
    if progress is not None:
        progress.start(CONVERGENCE_PHASE, trials)
        for trial in range(done):
            progress.advance(CONVERGENCE_PHASE, trial=trial + 1)
    for trial in range(done, trials):
        context, squared, repeated = start, torch.zeros((), dtype=torch.float64, device=device), False
        for a in range(0, n, ROLLOUT_BLOCK):
            projected = block.project_tokens(token_span(model, ids, a, min(a + ROLLOUT_BLOCK, n)))
            for i in range(projected.shape[0]):
                context = block.step(context, projected[i:i + 1])[-1].float()
                if trial and torch.equal(context[0], previous[a + i]):
                    repeated = True  # the rest of this trial is the previous one's
                    break
                if trial:
                    squared += (context[0] - previous[a + i]).double().pow(2).sum()
                previous[a + i] = context[0]
            if repeated:
                break
        if trial:
            history.append(float(squared) / (n * width))
        start = previous[-1:].clone()
        if saved is not None:
            saved.after(trial + 1, previous, history)
        if progress is not None:
            progress.advance(CONVERGENCE_PHASE, trial=trial + 1, **({"mse": history[-1]} if trial else {}))
    if progress is not None:
        progress.finish(CONVERGENCE_PHASE)
    first, last = (history[0], history[-1]) if history else (None, None)
    reduction = (100 * (first - last) / first) if first and last is not None else None
    slope = _slope(history)
    return {"status": classify_trials(history), "trials": trials, "history": history, "first_loss": first,
            "last_loss": last, "reduction_pct": reduction, "slope": slope}


def stats_rows(n: int, seed: int, rows: int = STATS_ROWS) -> torch.Tensor:
    """The rows the statistics read of an n-row stream: all up to `rows`, else that many drawn with a
    private generator (the run's RNG stream is untouched), in stream order."""
    if n <= rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values


def _sample(contexts: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    return contexts[stats_rows(contexts.shape[0], seed, rows).to(contexts.device)].to("cpu", torch.float64)


def context_stats(contexts: torch.Tensor, seed: int, rows: int = STATS_ROWS, stream: str = "") -> dict[str, Any]:
    """Actual rank, sparsity, mean row norm and mean pairwise distance and cosine (spec §5) of ≤ `rows`
    sampled rows, with the reference's two degeneracy flags: every context near zero ("zero
    solution"), or every context near one point ("global attractor").

    Non-finite contexts end the run (RunFailed, exit 1) instead of becoming NaN statistics: Phase 2
    would train on them and every number after it would be meaningless, and the cause (a block or
    embedding with NaN/inf weights) is worth naming where it first shows."""
    x = _sample(contexts, rows, seed)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        which = f"{stream} " if stream else ""
        raise RunFailed(f"diagnostics: {bad:,} of {x.numel():,} sampled values of the frozen {which}contexts are "
                        f"NaN or infinite; the ContextBlock's weights or the embedding table hold "
                        f"NaN/inf (a damaged checkpoint or embedding file): check them, or delete the unit's "
                        f"checkpoint to retrain it")
    m = x.shape[0]
    norms = x.norm(dim=1)
    unit = x / norms.clamp_min(1e-12).unsqueeze(1)
    distance = cosine = 0.0
    for a in range(0, m, PAIR_BLOCK):  # sums over all ordered pairs; the diagonal adds 0 and m·1
        distance += float(torch.cdist(x[a:a + PAIR_BLOCK], x).sum())
        cosine += float((unit[a:a + PAIR_BLOCK] @ unit.T).sum())
    pairs = m * (m - 1)
    mean_distance = distance / pairs if pairs else 0.0
    mean_cosine = (cosine - float((norms > 0).sum())) / pairs if pairs else 1.0
    mean_norm = float(norms.mean())
    return {
        "rows": m,
        "actual_rank": int((torch.linalg.svdvals(x) > RANK_TOLERANCE).sum()),
        "sparsity": float((x.abs() < SPARSE_BELOW).double().mean()),
        "mean_row_norm": mean_norm,
        "mean_pairwise_distance": mean_distance,
        "mean_pairwise_cosine": mean_cosine,
        "zero_solution": mean_norm < ZERO_NORM,
        "global_attractor": mean_distance < ATTRACTOR_DISTANCE and mean_cosine > ATTRACTOR_COSINE,
    }


def seed_diagnostics(model: Any, val_ids: torch.Tensor, sampled: dict[str, torch.Tensor],
                     solves: dict[str, SolveResult], trials: int, seed: int, progress: Any = None,
                     saved: TrialsCheckpoint | None = None) -> dict[str, Any]:
    """Every diagnostic of the seed for one unit's frozen block, as one JSON-able dict.

    `sampled` holds each stream's rows `stats_rows` picks (a ddp rank gathers them from the ranks'
    stores). `gain` is the contraction gain ρ the frozen solves measured (None where a solve did
    not need it, e.g. `solver.solve = "sequential"`): with ρ < 1 parallel solves are exact and
    fp32 contexts reproducible; with ρ ≥ 1 differences grow along the stream. Matrix products run
    in full fp32 (no TF32), like the frozen solves, so the numbers do not depend on the runner's `tf32`.
    """
    with full_precision_matmuls():
        # first: non-finite contexts end the run before the rollouts spend time on them
        contexts = {name: context_stats(rows, seed, stream=name) for name, rows in sampled.items()}
        return {
            "identity": identity_check(model, seed),
            "val_convergence": convergence_check(model, val_ids, trials, progress, saved) if trials else None,
            "contexts": contexts,
            "gain": {name: None if s.gain is None or not math.isfinite(s.gain) else s.gain
                     for name, s in solves.items()},
        }


def diagnostic_warnings(diagnostics: dict[str, Any]) -> list[str]:
    """One line per diagnostic that the reference flagged."""
    out = []
    identity = diagnostics["identity"]
    if identity["identity"]:
        out.append(f"the ContextBlock is close to an identity mapping (mean cosine {identity['mean_cosine']:.3f} "
                   f"> {IDENTITY_THRESHOLD} over {IDENTITY_PROBES} probes): its contexts ignore the tokens")
    check = diagnostics["val_convergence"]
    if check is not None and check["status"] in ("DIVERGING", "UNSTABLE"):
        out.append(f"validation convergence check: {check['status']} over {check['trials']} sequential trials")
    for name, stats in diagnostics["contexts"].items():
        if stats["zero_solution"]:
            out.append(f"{name} contexts are a zero solution (mean row norm {stats['mean_row_norm']:.3g} "
                       f"< {ZERO_NORM})")
        if stats["global_attractor"]:
            out.append(f"{name} contexts collapse to a global attractor (mean distance "
                       f"{stats['mean_pairwise_distance']:.3g}, mean cosine {stats['mean_pairwise_cosine']:.3f})")
    return out
