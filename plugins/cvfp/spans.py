"""Token inputs for a span (or any rows) of a stream, computed from the ids alone.

At scale no [n, T] tensor of token inputs may exist: solvers and Phase 2 compute each chunk's
or batch's inputs when they need them. A model whose input at position i reads the N tokens
i−N+1 … i (`num_input_tokens`, 1 when absent) needs N−1 ids before the span; at the stream start
those are the zeros `token_inputs` pads with, so a span equals the same rows of the whole stream's.
"""

from __future__ import annotations

from typing import Any

import torch


def token_span(model: Any, ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop−1 of `model.token_inputs(ids)`, computed from ids[start − N + 1 : stop] only."""
    history = int(getattr(model, "num_input_tokens", 1)) - 1
    first = max(start - history, 0)
    return model.token_inputs(ids[first:stop])[start - first:]


def token_rows(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token inputs at any positions of a stream (a gather, where `token_span` takes a span).

    Row p reads only ids p−N+1 … p, so each row is the last row of its own N-id window; positions
    whose window reaches before the stream start take the stream's first rows, which hold the zeros.
    """
    history = int(getattr(model, "num_input_tokens", 1)) - 1
    if history == 0:
        return model.token_inputs(ids[positions])
    windows = positions.unsqueeze(1) + torch.arange(-history, 1, device=positions.device)
    x = model.token_inputs(ids[windows.clamp(min=0)].flatten())[history::history + 1]
    early = positions < history
    if bool(early.any()):
        x[early] = token_span(model, ids, 0, min(history, ids.shape[0]))[positions[early]]
    return x
