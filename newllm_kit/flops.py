"""Training compute of a unit: FLOPs counted from the layer shapes, as the benchmarks count them.

A forward pass costs F FLOPs per token: 2 × the multiply-adds of every weight matrix it applies
(matmuls only: LayerNorm, activations and biases are O(width) and left out, as nanoGPT's
`estimate_mfu`); a training step costs 3F per token (the backward pass twice the forward). Each
recipe counts its own phases from what it ran (iterations, epochs, steps), never in a loop that a
resume restarts, so a resumed unit records the same FLOPs as an uninterrupted one.

A record's `flops` is `{phase: FLOPs, …, "eval": …, "total": …}`: `total` is the training compute
(every phase but `eval`); `eval`, the scoring of the validation (and development) stream, is beside
it, not in it. `train_flops` repeats `total`: the results table's FLOPs column and results.csv's.
`flops_method` says how the per-token count was obtained (`layer shapes`, or nanoGPT's `6N` rule
for a model without `flops_per_token`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

SHAPES = "layer shapes"  # the model (or the recipe) counted its matmuls
SIX_N = "6N"  # no count of its own: 2 × parameters per forward token, nanoGPT's rule


def linear_flops(module: nn.Module) -> int:
    """Forward FLOPs per token of every `nn.Linear` in `module`: 2 × its weight's elements."""
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def parameter_flops(model: nn.Module) -> int:
    """nanoGPT's rule for a model that does not count its own: 2 × every parameter outside the embedding
    tables (a lookup costs no matmul), plus 2·E·V for the logits when the head reads a table."""
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    head = getattr(model, "output_head", None)
    weight = head()[0] if callable(head) else None
    tied = weight is not None and id(weight) in tables
    return 2 * body + (2 * weight.numel() if tied and weight is not None else 0)


def forward_flops_per_token(model: Any, context: int) -> tuple[int, str]:
    """(forward FLOPs of one token that reads `context` earlier tokens, head included; how they were
    counted): the model's own `flops_per_token(context)` where it has one, else `parameter_flops`."""
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return int(own(context)), SHAPES
    return parameter_flops(model), SIX_N


def train_flops(record: dict[str, Any]) -> float | None:
    """A results record's training FLOPs (`train_flops`, else `flops.total`); None for a record written
    before FLOPs were counted, or by a recipe that does not count them."""
    value = record.get("train_flops")
    if value is None and isinstance(record.get("flops"), dict):
        value = record["flops"].get("total")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def flops_text(value: float | None) -> str:
    """3 significant digits with a bare exponent ("3.21e12"), as FLOPs are quoted; "—" for none."""
    if value is None:
        return "—"
    if value < 1000:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"
