"""Which rows of a stream's [n, C] contexts a rank holds, and where they sit in its local store.

Under ddp no rank holds a whole stream: Phase 1 keeps its contiguous shard, and a Phase-2 store
keeps the rows that this rank's slices of the global batches read (position p reads row p − 1),
which are spread over the whole stream. A `RowMap` lists those rows as sorted global spans laid
end to end in the local tensor; over one process it is the whole stream, one span. The spans of
all ranks partition [0, n), so a row anyone asks for has exactly one owner and can be gathered
by a sum of zero-padded blocks (`gather`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from newllm_kit.protocols import Collectives
from newllm_kit.training import spans

GATHER_ROWS = 8192  # rows per collective of a gather or a redistribution


@dataclass(frozen=True)
class RowMap:
    """Global rows [start, stop) of an n-row stream, held one span after another in a local tensor."""

    n: int
    spans: tuple[tuple[int, int], ...]
    starts: list[int] = field(init=False, repr=False, compare=False)  # global start of each span
    offsets: list[int] = field(init=False, repr=False, compare=False)  # local start of each span

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for a, b in self.spans:
            if not 0 <= a < b <= self.n:
                raise ValueError(f"span [{a}, {b}) is empty or outside [0, {self.n})")
            offsets.append(total)
            total += b - a
        if any(b > a2 for (_, b), (a2, _) in zip(self.spans, self.spans[1:], strict=False)):
            raise ValueError("spans must be sorted and disjoint")
        object.__setattr__(self, "starts", [a for a, _ in self.spans])
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def whole(cls, n: int) -> RowMap:
        return cls(n, ((0, n),) if n else ())

    @classmethod
    def of(cls, n: int, rows: range) -> RowMap:
        """One contiguous span (a Phase-1 shard)."""
        return cls(n, ((rows.start, rows.stop),) if len(rows) else ())

    @property
    def rows(self) -> int:
        """Rows held locally."""
        return sum(b - a for a, b in self.spans)

    @property
    def is_whole(self) -> bool:
        return self.spans == ((0, self.n),)

    def local(self, start: int, stop: int) -> slice:
        """The local slice of global rows [start, stop), which must lie inside one span."""
        if start >= stop:
            return slice(0, 0)
        k = bisect.bisect_right(self.starts, start) - 1
        if k < 0 or stop > self.spans[k][1]:
            raise IndexError(f"rows [{start}, {stop}) are not held here (spans {self.spans[:4]}…)")
        a = self.offsets[k] + start - self.spans[k][0]
        return slice(a, a + stop - start)

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(global start, global stop, local start) of every held part of [start, stop)."""
        k = max(bisect.bisect_right(self.starts, start) - 1, 0)
        for (a, b), offset in zip(self.spans[k:], self.offsets[k:], strict=True):
            if a >= stop:
                return
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                yield lo, hi, offset + lo - a

    def held_before(self, position: int) -> int:
        """Local rows of global rows before `position`: the prefix of the local store a rollout has filled."""
        return sum(max(0, min(b, position) - a) for a, b in self.spans)

    def longest_gap(self) -> int:
        """The most consecutive rows not held between two held spans."""
        return max((a2 - b for (_, b), (a2, _) in zip(self.spans, self.spans[1:], strict=False)), default=0)

    def local_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Each global position's local row, −1 where it is not held."""
        starts = torch.tensor(self.starts or [0], device=positions.device)
        stops = torch.tensor([b for _, b in self.spans] or [0], device=positions.device)
        offsets = torch.tensor(self.offsets or [0], device=positions.device)
        positions = positions.contiguous()
        k = (torch.searchsorted(starts, positions, right=True) - 1).clamp_min(0)
        held = (positions >= starts[k]) & (positions < stops[k]) & (len(self.spans) > 0)
        return torch.where(held, offsets[k] + positions - starts[k], -1)


def batch_rows(n: int, batch: int, shard: Callable[[int], range]) -> RowMap:
    """The rows a rank's Phase-2 slices read from an n-position stream's store: global batches of
    `batch` positions (the last may be short) over the n − 1 predicted positions, this rank's slice of
    each by `shard`, position p reading row p − 1. Position 0 reads a zero row, so its slice starts at
    row 0; rows n − 2 and n − 1 are read by no one and go to the last slice, so that the ranks' maps
    partition [0, n)."""
    positions = n - 1
    held: list[tuple[int, int]] = []
    for span in spans(range(positions), batch):
        part = shard(len(span))
        if not len(part):
            continue
        a, b = max(span.start + part.start - 1, 0), span.start + part.stop - 1
        b = n if span.start + part.stop == positions else b
        if a >= b:
            continue
        if held and held[-1][1] == a:
            held[-1] = (held[-1][0], b)
        else:
            held.append((a, b))
    return RowMap(n, tuple(held))


def gather(local: torch.Tensor, where: RowMap, indices: torch.Tensor, runner: Collectives) -> torch.Tensor:
    """Rows `indices` of the stream (fp32, on the CPU, in the order given) on every rank, each
    contributed by its owner: a sum of zero-padded blocks, exact. Over one process, plain indexing."""
    if runner.world_size == 1:
        return local[indices.to(local.device)].to("cpu", torch.float32)
    out = torch.empty(indices.numel(), local.shape[1])
    for a in range(0, indices.numel(), GATHER_ROWS):
        chunk = indices[a:a + GATHER_ROWS]
        rows = where.local_index(chunk)
        piece = torch.zeros(chunk.numel(), local.shape[1], device=runner.device)
        held = rows >= 0
        if bool(held.any()):
            piece[held.to(runner.device)] = local[rows[held].to(local.device)].to(runner.device, torch.float32)
        out[a:a + GATHER_ROWS] = runner.all_reduce_sum(piece).cpu()
    return out


def redistribute(read: Callable[[int, int], torch.Tensor] | None, source: range, out: torch.Tensor,
                 wanted: RowMap, runner: Collectives) -> None:
    """Move rows from the ranks that hold them to the ranks that want them: every rank in turn sends
    its `source` rows (a contiguous range; `read(a, b)` gives its rows [a, b) as a tensor) block by
    block, and every rank keeps the part of each block in `wanted`, written into `out` (its local
    store). Every rank takes part in every block, so no rank waits for another's long work."""
    ranges = [(a, b) for a, b in per_rank([source.start, source.stop], runner)]
    for owner, (first, last) in enumerate(ranges):
        for a in range(first, last, GATHER_ROWS):
            b = min(a + GATHER_ROWS, last)
            if owner == runner.rank and read is not None:
                block = read(a, b).to(runner.device, torch.float32)
            else:
                block = torch.empty(b - a, out.shape[1], device=runner.device)
            if runner.world_size > 1:
                block = runner.broadcast(block, owner)
            for lo, hi, at in wanted.pieces(a, b):
                out[at:at + hi - lo] = block[lo - a:hi - a].to(out.device, out.dtype)


def per_rank(values: list[int], runner: Collectives) -> list[list[int]]:
    """Every rank's few integers `values` (the same count on each), by rank: one sum of a table that
    each rank fills in its own row."""
    if runner.world_size == 1:
        return [list(values)]
    table = torch.zeros(runner.world_size, len(values), dtype=torch.long, device=runner.device)
    table[runner.rank] = torch.tensor(values, device=runner.device)
    return [[int(v) for v in row] for row in runner.all_reduce_sum(table).cpu()]
