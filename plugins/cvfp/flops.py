"""The cvfp recipe's training compute (`newllm_kit.flops`), from what a unit ran.

With C = `context_flops_per_token` (one ContextBlock evaluation: `step` and its share of
`project_tokens`) and T = `token_flops_per_token(include_head=True)` (TokenBlock + 2·E·V logits):

* `phase1`: 3·C per token of every Phase-1 pass (forward + backward, as `benchmarks/phase1.py`
  counts a pass) plus C per token evaluation of the iteration-0 rollout (forward only): the
  solver's `token_evaluations`, split by what iteration 0 reports;
* `solve`: C per token evaluation of the training stream's frozen solve (0 when Phase 2 trains
  on Phase 1's final contexts, `phase2.train_contexts = "phase1"`);
* `phase2`: per epoch run and training position, 3·T (as `benchmarks/phase2.py`) plus C for the
  batch's per-layer contexts, recomputed by one ContextBlock step without gradients;
* `eval`: the frozen solves of the validation (and development) stream, C per token evaluation,
  and every Phase-2 evaluation, C + T per position: each epoch's of the early-stopping stream
  and, with a development split, the validation stream's once at the end.

`total` = phase1 + solve + phase2. The diagnostics (the validation convergence trials, the
phase1-vs-rollout comparison) are in none of them. Under ddp, work each rank repeats (the
iteration-0 rollout) counts once. In split mode (S context splits, `split_phase1`) the splits'
report gives no iteration-0 share: every split pass is counted as a full pass over its samples
at C/S a token (exact for `cvfp`, an upper bound for `gradual-decrease`) and the remaining
evaluations (the splits' rollouts, the merged solve) at C, an upper bound. A third-party solver
that reports no `extra["iteration0"]["evaluations"]` has all its evaluations counted at 3·C.
"""

from __future__ import annotations

from typing import Any

from .contract import Phase1Report, SolveResult
from .model import context_flops_per_token, token_flops_per_token


def phase1_flops(model: Any, report: Phase1Report) -> int:
    """Phase 1's FLOPs from the solver's report (see the module docstring)."""
    context = context_flops_per_token(model)
    splits = report.extra.get("splits")
    if splits:
        passes = sum((s["iterations"] - 1) * s["tokens"] for s in splits)
        forward = max(report.token_evaluations - passes, 0)
        return 3 * (context // len(splits)) * passes + context * forward
    first = report.extra.get("iteration0")
    forward = first.get("evaluations", 0) if isinstance(first, dict) else 0
    return 3 * context * (report.token_evaluations - forward) + context * forward


def unit_flops(model: Any, phase1: int | None, solves: dict[str, SolveResult | None], epochs_run: int,
               tokens: dict[str, int]) -> dict[str, Any]:
    """The record's `flops`, `train_flops` and `flops_method`: Phase 1's FLOPs (`phase1_flops`, None when a
    checkpoint from before they were counted holds the summary), the frozen solves by stream, the epochs
    Phase 2 ran, and the token count of each stream ("train", "val", "dev" where there is one)."""
    if not isinstance(phase1, int) or isinstance(phase1, bool) or phase1 < 0:
        phase1 = None  # not in the checkpoint's summary (or not a count): the total is unknown
    context = context_flops_per_token(model)
    token = token_flops_per_token(model, include_head=True)
    solved = {name: context * result.token_evaluations for name, result in solves.items() if result is not None}
    train_positions = tokens["train"] - 1
    phase2 = epochs_run * train_positions * (3 * token + context)
    selecting = tokens.get("dev", tokens["val"])
    scored = epochs_run * (selecting - 1) + (tokens["val"] - 1 if "dev" in tokens and epochs_run else 0)
    evaluation = sum(v for name, v in solved.items() if name != "train") + scored * (context + token)
    total = None if phase1 is None else phase1 + solved.get("train", 0) + phase2
    flops = {"phase1": phase1, "solve": solved.get("train", 0), "phase2": phase2, "eval": evaluation,
             "total": total}
    return {"flops": flops, "train_flops": total, "flops_method": "layer shapes"}
