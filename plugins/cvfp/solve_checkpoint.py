"""A frozen solve's store and the validation trials, saved beside the unit's checkpoint as they go.

At the seed's next scale a sequential rollout of the training stream takes hours and the
validation trials tens of minutes; a killed unit must lose only the work since the last save
(`solver.checkpoint_every` seconds), and a finished solve must never run again. Each rank keeps
its own files in `checkpoints/<unit>/` (the rank and world size in their names under ddp):

* `solve-<stream>.rows`: the rank's store rows in local order, raw, in the store's dtype,
  appended block by block and fsynced; a `disk` store is this file itself (memory-mapped), so
  saving it is syncing it and nothing is written twice;
* `solve-<stream>.json`: how many of those rows are final, the rollout's position and carried
  context (JSON floats: fp32 values round-trip exactly), and, once finished, the solve's summary;
  replaced atomically after the rows it counts are on disk, so rows past the count (a kill between
  the two) are cut off on resume;
* `trials-<k>.rows` / `trials.json`: the contexts of validation trial k, the last one saved, and
  the MSE history; the JSON names k, so a kill between the two files leaves the older pair.

Nothing here is a pickle; a file that does not fit (another stream length, width, dtype, row map
or version) or cannot be read is discarded and that piece of work starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, BinaryIO, cast

import torch

from newllm_kit.protocols import Checkpointer, Collectives

from .contract import SolveResult
from .row_map import RowMap

VERSION = 1
BLOCK_ROWS = 8192  # rows per write or read


def rank_suffix(runner: Collectives) -> str:
    """What a rank's own file names carry under ddp (`.rank1-of-2`): a resume with another number of
    ranks finds none of them. Nothing over one process."""
    return f".rank{runner.rank}-of-{runner.world_size}" if runner.world_size > 1 else ""


def rows_file(stream: str, runner: Collectives) -> str:
    """The file of one stream's saved rows on this rank; a disk store is this file itself."""
    return f"solve-{stream}{rank_suffix(runner)}.rows"


def _raw(rows: torch.Tensor) -> bytes:
    return rows.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _write_rows(handle: BinaryIO, store: torch.Tensor, start: int, stop: int) -> None:
    for a in range(start, stop, BLOCK_ROWS):
        handle.write(_raw(store[a:min(a + BLOCK_ROWS, stop)]))


def _read_rows(path: os.PathLike[str], out: torch.Tensor, rows: int) -> None:
    """The first `rows` rows of `path` into `out` (same dtype and width), a block at a time."""
    width, size = out.shape[1], out.element_size()
    with open(path, "rb") as handle:
        for a in range(0, rows, BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, rows)
            data = handle.read((b - a) * width * size)
            if len(data) != (b - a) * width * size:
                raise ValueError(f"{path}: {len(data)} bytes where {(b - a) * width * size} were expected")
            block = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(out.dtype).view(b - a, width)
            out[a:b] = block.to(out.device)


class StoreCheckpoint:
    """One stream's frozen solve on this rank: `completed` reloads a finished or started one, the solver
    hears of the rollout through `resumed`/`reached` (a `frozen_solve.RolloutProgress`), `finish` marks
    it done."""

    def __init__(self, checkpoint: Checkpointer, stream: str, store: torch.Tensor, where: RowMap,
                 runner: Collectives, every_s: float, say: Any, in_place: bool = False) -> None:
        self.checkpoint, self.store, self.where, self.every_s, self.say = checkpoint, store, where, every_s, say
        self.stream = stream
        self.in_place = in_place  # the store is a memory-mapped `rows_file`: saving is syncing it
        self.rows_name, self.state_name = rows_file(stream, runner), f"solve-{stream}{rank_suffix(runner)}.json"
        spans = hashlib.sha256(json.dumps(where.spans).encode()).hexdigest()[:16]
        self.fits = {"version": VERSION, "n": where.n, "width": store.shape[1], "rows": where.rows,
                     "dtype": str(store.dtype).removeprefix("torch."), "spans": spans}
        self.saved = 0  # local rows on disk
        self.position, self.carry = 0, cast(torch.Tensor | None, None)
        self.last = time.monotonic()

    def completed(self) -> SolveResult | None:
        """The saved solve when it finished (its rows now in the store); otherwise None, with a started
        rollout's rows loaded and its position kept for `resumed`. A file that does not fit is dropped."""
        state = self._state()
        if state is None:
            if not self.in_place:
                self.checkpoint.file(self.rows_name).unlink(missing_ok=True)
            return None
        rows = int(state["saved"])
        if not self.in_place:  # a disk store already holds its rows: its file is the saved one
            try:
                _read_rows(self.checkpoint.file(self.rows_name), self.store, rows)
            except (OSError, ValueError) as error:
                self.say(f"warning: {self.checkpoint.file(self.rows_name)} is unreadable ({error}); solving again")
                self.checkpoint.file(self.state_name).unlink(missing_ok=True)
                self.checkpoint.file(self.rows_name).unlink(missing_ok=True)
                return None
            with open(self.checkpoint.file(self.rows_name), "r+b") as handle:  # rows past the record: a kill
                handle.truncate(rows * self.store.shape[1] * self.store.element_size())
        self.saved = rows
        if state.get("result") is not None:
            r = state["result"]
            return SolveResult([self.store], r["method"], r["iterations"], r["token_evaluations"], r["seconds"],
                               r["max_change"], r["gain"], {**r["extra"], "resumed": True})
        self.position = int(state["position"])
        self.carry = torch.tensor([state["carry"]], dtype=torch.float32)
        self.say(f"{self.stream} rollout continues from position {self.position:,} of {self.where.n:,} (saved)")
        return None

    def _state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.checkpoint.file(self.state_name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            self.say(f"warning: {self.checkpoint.file(self.state_name)} is unreadable ({error}); solving again")
            return None
        if not isinstance(state, dict) or state.get("fits") != self.fits:
            return None
        if not isinstance(state.get("saved"), int) or not 0 <= state["saved"] <= self.where.rows:
            return None
        if state.get("result") is None and not (isinstance(state.get("position"), int)
                                                and isinstance(state.get("carry"), list)
                                                and len(state["carry"]) == self.store.shape[1]):
            return None
        return state

    # -- frozen_solve.RolloutProgress --------------------------------------------------------
    def resumed(self) -> tuple[int, torch.Tensor | None]:
        return self.position, self.carry

    def reached(self, position: int, context: torch.Tensor, out: torch.Tensor) -> None:
        if time.monotonic() - self.last >= self.every_s and position < self.where.n:
            self._save(position, context, None)

    def finish(self, result: SolveResult) -> None:
        """All rows are final: saved with the solve's summary, so a resume only reads them back."""
        summary = {"method": result.method, "iterations": result.iterations,
                   "token_evaluations": result.token_evaluations, "seconds": result.seconds,
                   "max_change": result.max_change, "gain": _finite(result.gain),
                   "extra": json.loads(json.dumps(result.extra, default=str))}
        self._save(self.where.n, None, summary)

    def _save(self, position: int, context: torch.Tensor | None, result: dict[str, Any] | None) -> None:
        done = self.where.held_before(position)
        if self.in_place:
            with open(self.checkpoint.file(self.rows_name), "rb") as handle:  # the mapping's dirty pages
                os.fsync(handle.fileno())
        elif done > self.saved:
            self.checkpoint.append(self.rows_name, lambda handle: _write_rows(handle, self.store, self.saved, done))
        carry = None if context is None else [float(v) for v in context.reshape(-1).float().cpu()]
        state = {"fits": self.fits, "saved": done, "position": position, "carry": carry, "result": result}
        self.checkpoint.write_stream(self.state_name, lambda handle: _write_json(handle, state))
        self.saved, self.last = done, time.monotonic()


def _write_json(handle: BinaryIO, value: Any) -> None:
    handle.write(json.dumps(value).encode())


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


class TrialsCheckpoint:
    """The validation trials' progress on this rank: after a finished trial (at most every `every_s`
    seconds) its contexts and the MSE history; a resume continues with the next trial."""

    def __init__(self, checkpoint: Checkpointer, n: int, width: int, trials: int, runner: Collectives,
                 every_s: float) -> None:
        self.checkpoint, self.every_s, self.suffix = checkpoint, every_s, rank_suffix(runner)
        self.state_name = f"trials{self.suffix}.json"
        self.fits = {"version": VERSION, "n": n, "width": width, "trials": trials}
        self.last = time.monotonic()
        self.saved: int | None = None  # the trial whose rows file the published state names

    def _rows_name(self, done: int) -> str:
        return f"trials{self.suffix}-{done}.rows"

    def resume(self, previous: torch.Tensor) -> tuple[int, list[float]] | None:
        """(trials done, history) with the last one's contexts in `previous`, or None to start over."""
        try:
            state = json.loads(self.checkpoint.file(self.state_name).read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("fits") != self.fits:
                return None
            done, history = int(state["done"]), [float(v) for v in state["history"]]
            if not 1 <= done < self.fits["trials"] or len(history) != done - 1:
                return None
            _read_rows(self.checkpoint.file(self._rows_name(done)), previous, previous.shape[0])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.saved = done
        return done, history

    def after(self, done: int, previous: torch.Tensor, history: list[float]) -> None:
        """Trial `done` finished: saved when the interval has passed (never after the last one)."""
        if done >= self.fits["trials"] or time.monotonic() - self.last < self.every_s:
            return
        self.checkpoint.write_stream(self._rows_name(done),
                                     lambda handle: _write_rows(handle, previous, 0, previous.shape[0]))
        state = {"fits": self.fits, "done": done, "history": history}
        self.checkpoint.write_stream(self.state_name, lambda handle: _write_json(handle, state))
        if self.saved is not None:  # the state no longer names it
            self.checkpoint.file(self._rows_name(self.saved)).unlink(missing_ok=True)
        self.saved, self.last = done, time.monotonic()
