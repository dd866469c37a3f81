"""Phase 1's final contexts as the training stream's Phase-2 store (`phase2.train_contexts = "phase1"`).

The reference's later code (spec §4.2, §7 item 7) dropped the sequential rollout over the training
stream: position i reads F(P_{i−1}, x_i), P being Phase 1's final contexts, position 0 a zero
context. `Phase2Data` computes F(c_{i−1}, x_i) from whatever store it is given, so P itself is that
store. A killed unit must resume with the same P, which nothing later can recreate, so it is saved
once beside the unit's checkpoints: a safetensors file streamed block by block (a 5M-token v2
stream is 15 GB; it is never held twice), read back block by block into the store.

Under ddp each rank holds only its Phase-1 shard, so each writes its own file (rank and world
size in the name, the shard's first row in the header) and no rank ever holds the whole stream;
reading them back moves every row to the rank whose Phase-2 slices read it (`row_map.redistribute`).
A resume with another number of ranks is refused: the files are another job's shards.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from newllm_kit.errors import UserError
from newllm_kit.protocols import Collectives

from .row_map import RowMap, per_rank, redistribute
from .solve_checkpoint import rank_suffix

FILE = "phase1-contexts.safetensors"
KEY = "contexts"
ROWS = 8192  # rows per block written or read
SHARD = re.compile(r"phase1-contexts\.rank(\d+)-of-(\d+)\.safetensors")


def file_name(runner: Collectives) -> str:
    """This rank's file: FILE over one process."""
    return f"phase1-contexts{rank_suffix(runner)}.safetensors"


def write(handle: BinaryIO, contexts: torch.Tensor, first: int = 0) -> None:
    """`contexts` ([m, C] fp32, any device: stream rows first … first + m − 1) in the safetensors
    layout: header length, JSON header padded to 8 bytes, raw little-endian data; written a block
    of rows at a time."""
    m, width = contexts.shape
    header = json.dumps({"__metadata__": {"first": str(first)},
                         KEY: {"dtype": "F32", "shape": [m, width], "data_offsets": [0, m * width * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    handle.write(struct.pack("<Q", len(header)) + header)
    for a in range(0, m, ROWS):
        handle.write(contexts[a:a + ROWS].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _shard(path: Path, width: int) -> range | None:
    """The stream rows the file holds, or None when it is missing, damaged or of another width."""
    try:
        with safe_open(str(path), framework="pt") as opened:
            first = int((opened.metadata() or {}).get("first", "0"))
            source = opened.get_slice(KEY)
            shape = list(source.get_shape())
            if len(shape) != 2 or shape[1] != width or source.get_dtype() != "F32" or first < 0:
                return None
            return range(first, first + shape[0])
    except (OSError, SafetensorError, ValueError):
        return None


def _foreign_world(folder: Path, runner: Collectives) -> int:
    """The world size of another job's files in `folder` (0: none)."""
    names = [path.name for path in folder.glob("phase1-contexts*.safetensors")] if folder.is_dir() else []
    sizes = {int(m.group(2)) for m in map(SHARD.fullmatch, names) if m} | ({1} if FILE in names else set())
    return max(sizes - {runner.world_size}, default=0)


def readable(folder: Path, rows: int, width: int, runner: Collectives) -> bool:
    """Whether the ranks' files in `folder` together hold stream rows [0, rows) of width `width`, each
    row once. Files of a job with another number of ranks are refused in one line (a UserError)."""
    shard = _shard(folder / file_name(runner), width)
    foreign = _foreign_world(folder, runner)
    table = per_rank([foreign, shard is not None, shard.start if shard else 0, shard.stop if shard else 0], runner)
    other = max(row[0] for row in table)
    if other:
        raise UserError(f"{folder}: Phase 1's contexts were saved by a {other}-process job; resume with "
                        f"{other} processes (torchrun --nproc_per_node={other}), or delete that folder to train "
                        f"the unit again with {runner.world_size}")
    if not all(row[1] for row in table):
        return False
    covered = sorted((a, b) for _, _, a, b in table if b > a)
    expected = 0
    for a, b in covered:
        if a != expected:
            return False
        expected = b
    return expected == rows


def read_into(folder: Path, out: torch.Tensor, wanted: RowMap, runner: Collectives) -> None:
    """Fill `out` (the rows `wanted` holds, any device and dtype) from the ranks' files, which
    `readable` accepted: every rank sends its file's rows, every rank keeps what it wants."""
    path = folder / file_name(runner)
    with safe_open(str(path), framework="pt") as opened:
        first = int((opened.metadata() or {}).get("first", "0"))
        source = opened.get_slice(KEY)
        rows = range(first, first + source.get_shape()[0])
        redistribute(lambda a, b: source[a - first:b - first], rows, out, wanted, runner)
