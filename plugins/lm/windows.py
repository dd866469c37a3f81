"""How the lm recipe cuts a stream into windows: independent training windows, truncated-BPTT lanes
for a carried state, and the overlapping evaluation windows of an attention model that score every
position once. Shared by the recipe and its FLOP count (`flops`)."""

from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    """Inputs ids[start : start+length] predicting ids[start+1 : start+length+1]; the first `skip`
    predictions are not scored (an evaluation window's context positions)."""

    start: int
    length: int
    skip: int = 0


def train_windows(positions: int, window: int) -> list[Window]:
    """Consecutive windows over the `positions` = n − 1 predictions of a stream, the last one shorter."""
    return [Window(start, min(window, positions - start)) for start in range(0, positions, window)]


def lane_windows(positions: int, lanes: int, window: int) -> list[list[Window]]:
    """Truncated BPTT's steps over the `positions` = n − 1 predictions of a stream: at most `lanes`
    contiguous lanes of ⌈positions / lanes⌉ (the last one shorter), step k holding window k of every
    lane, in lane order. Windows have `window` predictions, fewer at a lane's end; the last lane's may
    be empty (length 0) once it has ended. Every prediction is in exactly one window."""
    length = -(-positions // lanes)
    starts = range(0, positions, length)
    return [[Window(start + k, max(min(window, length - k, positions - start - k), 0)) for start in starts]
            for k in range(0, length, window)]


def eval_windows(positions: int, block_size: int, stride: int) -> list[Window]:
    """Windows of min(block_size, positions) tokens, `stride` apart and ending at the stream's end, that
    score each of the `positions` predictions exactly once: the first all of its own, each later one
    its newest `stride` (fewer in the last)."""
    length, scored, windows = min(block_size, positions), 0, list[Window]()
    while scored < positions:
        end = min(scored + (stride if windows else length), positions)
        windows.append(Window(end - length, length, length - (end - scored)))
        scored = end
    return windows
