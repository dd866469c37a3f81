"""Phase 1's final contexts as the training stream's Phase-2 store (`phase2.train_contexts = "phase1"`).

The reference's later code (spec §4.2, §7 item 7) dropped the sequential rollout over the training
stream: position i reads F(P_{i−1}, x_i), P being Phase 1's final contexts, position 0 a zero
context. `Phase2Data` computes F(c_{i−1}, x_i) from whatever [n, C] store it is given, so P itself
is that store. A killed unit must resume with the same P, which nothing later can recreate, so it
is saved once beside the unit's checkpoints: a safetensors file streamed block by block (a 5M-token
v2 stream is 15 GB; it is never held twice), read back block by block into the store.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from newllm_kit.protocols import Collectives

FILE = "phase1-contexts.safetensors"
KEY = "contexts"
ROWS = 8192  # rows per block written, read or broadcast


def write(handle: BinaryIO, contexts: torch.Tensor) -> None:
    """`contexts` ([n, C] fp32, any device) in the safetensors layout: header length, JSON header
    padded to 8 bytes, raw little-endian data; written a block of rows at a time."""
    n, width = contexts.shape
    header = json.dumps({KEY: {"dtype": "F32", "shape": [n, width], "data_offsets": [0, n * width * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    handle.write(struct.pack("<Q", len(header)) + header)
    for a in range(0, n, ROWS):
        handle.write(contexts[a:a + ROWS].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def readable(path: Path, rows: int, width: int, runner: Collectives) -> bool:
    """Whether the file holds [rows, width] fp32 contexts (rank 0 looks, every rank gets its answer)."""
    ok = True
    if runner.rank == 0:
        try:
            source = safe_open(str(path), framework="pt").get_slice(KEY)
            ok = list(source.get_shape()) == [rows, width] and source.get_dtype() == "F32"
        except (OSError, SafetensorError):
            ok = False
    if runner.world_size > 1:
        ok = bool(runner.broadcast(torch.tensor([float(ok)], device=runner.device), 0).item())
    return ok


def read_into(path: Path, out: torch.Tensor, runner: Collectives) -> None:
    """Fill `out` ([rows, C], any device and dtype) from a file `readable` accepted; under ddp rank 0
    reads and every rank receives the blocks, so the ranks need not share a filesystem."""
    rows, width = out.shape
    source = safe_open(str(path), framework="pt").get_slice(KEY) if runner.rank == 0 else None
    for a in range(0, rows, ROWS):
        b = min(a + ROWS, rows)
        block = source[a:b] if source is not None else torch.empty(b - a, width)
        if runner.world_size > 1:
            block = runner.broadcast(block.to(runner.device), 0)
        out[a:b] = block.to(out.device, out.dtype)
