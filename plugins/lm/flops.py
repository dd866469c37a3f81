"""The lm recipe's training compute (`newllm_kit.flops`), from what a unit ran.

* `train`: every epoch run trains on every training position once, in windows of ≤ `window` tokens,
  3 × F(window) per token (a recurrent model's F does not depend on the window, so carrying its
  state across windows changes nothing);
* `eval`: each epoch's evaluation of the early-stopping stream (development, else validation) and,
  with a development split, the one scoring of the validation stream after it: F per token of
  every window evaluated, context positions included (an attention model's windows overlap by
  block_size − eval_stride tokens), or of every position for a recurrent model.

F(t) is the model's `flops_per_token(t)` (t: the tokens a window reads) or nanoGPT's 6N rule
(`flops_method` says which). `total` = `train`. Counted from `epochs_run`, so a resumed unit
records what an uninterrupted one does (the re-evaluation a resume may need is not counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from newllm_kit.flops import forward_flops_per_token
from newllm_kit.protocols import UnitData

from .windows import eval_windows, train_windows


def _forward(model: Any, lengths: Iterable[int]) -> tuple[int, str]:
    """Forward FLOPs of windows of these lengths, each token reading its window; how F was counted."""
    total, method = 0, ""
    for length, count in Counter(lengths).items():
        per_token, method = forward_flops_per_token(model, length)
        total += count * length * per_token
    return total, method


def _stream(model: Any, tokens: int, window: int, stride: int | None, training: bool) -> tuple[int, str]:
    """Forward FLOPs of one pass over a stream of `tokens` ids: the training windows of ≤ `window` tokens
    (each position once), or an evaluation's windows (attention: `eval_windows`, overlapping; recurrent:
    segments of `window`, each position once). A recurrent model's F does not depend on the window."""
    positions, block = tokens - 1, model.block_size
    windows = (train_windows(positions, window) if training or block is None
               else eval_windows(positions, block, stride or max(block // 2, 1)))
    return _forward(model, (w.length for w in windows))


def unit_flops(model: Any, epochs_run: int, window: int, stride: int | None, data: UnitData) -> dict[str, Any]:
    """The record's `flops`, `train_flops` and `flops_method` of a unit that ran `epochs_run` epochs,
    each over every training position once and then an evaluation of the early-stopping stream."""
    epoch, method = _stream(model, data.train_ids.numel(), window, stride, training=True)
    train = 3 * epochs_run * epoch
    selecting = data.val_ids if data.dev_ids is None else data.dev_ids
    evaluations = epochs_run * _stream(model, selecting.numel(), window, stride, training=False)[0]
    if data.dev_ids is not None and epochs_run:
        evaluations += _stream(model, data.val_ids.numel(), window, stride, training=False)[0]
    return {"flops": {"train": train, "eval": evaluations, "total": train}, "train_flops": train,
            "flops_method": method}
