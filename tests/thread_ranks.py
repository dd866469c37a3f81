"""Distributed training without processes: each rank is a thread, collectives meet on a shared board.

The recipes' ddp paths shard data and sum gradients through the runner; these stand-ins let a test
run them in lock step and compare with one process, exactly (no gloo, no ports)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class BoardCollectives:
    """Mix into a runner: a contiguous shard per rank, and all_reduce_sum, broadcast and barrier
    through `board` (its "barrier" is a `threading.Barrier(world_size)`)."""

    rank: int
    world_size: int
    board: dict[Any, Any]

    def shard(self, n: int) -> range:
        size = -(-n // self.world_size)
        return range(min(n, self.rank * size), min(n, (self.rank + 1) * size))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        barrier: threading.Barrier = self.board["barrier"]
        self.board[self.rank] = tensor.clone()
        barrier.wait()
        total = sum(self.board[r] for r in range(self.world_size))
        barrier.wait()
        assert isinstance(total, torch.Tensor)
        return total


    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        barrier: threading.Barrier = self.board["barrier"]
        if self.rank == src:
            self.board["sent"] = tensor.clone()
        barrier.wait()
        tensor.copy_(self.board["sent"])
        barrier.wait()
        return tensor

    def barrier(self) -> None:
        self.board["barrier"].wait()


def run_ranks(world: int, rank: Callable[[int], None], timeout_s: float = 60) -> None:
    """`rank(r)` for every r at once, each on its own thread."""
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
