"""A unit's checkpoint handle for recipes (`newllm_kit.protocols.Checkpointer`).

Rank 0 reads and writes the run directory; every other rank gets rank 0's checkpoint by
broadcast, so ranks on machines without a shared --out continue from the same point. A damaged
checkpoint, or one that does not fit the model (the recipe's check says which), is reported in one
line and removed: the unit starts over.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .protocols import Collectives, Progress, Saved
from .rundir import CheckpointUnreadable, RunDir

# What a damaged checkpoint, or a recipe's check of one, raises. A check reads untrusted JSON, so a
# wrong type there surfaces as any of these; each means "do not resume from it", never a crash.
DAMAGED = (CheckpointUnreadable, ArithmeticError, AttributeError, LookupError, TypeError, ValueError)


def share(runner: Collectives, value: Any) -> Any:
    """Rank 0's `value` (anything JSON holds) on every rank: one rank decides, so ranks cannot diverge."""
    if runner.world_size == 1:
        return value
    data = json.dumps(value).encode() if runner.rank == 0 else b""
    size = runner.broadcast(torch.tensor([len(data)], device=runner.device), 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=runner.device)
    if runner.rank == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return json.loads(runner.broadcast(buffer, 0).cpu().numpy().tobytes())


def _share_saved(runner: Collectives, saved: Saved | None) -> Saved | None:
    """Rank 0's checkpoint on every rank: stage and state as JSON, then each tensor."""
    header = share(runner, None if saved is None else {
        "stage": saved.stage, "state": saved.state,
        "tensors": {group: {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in values.items()}
                    for group, values in saved.tensors.items()}})
    if header is None:
        return None
    groups = saved.tensors if saved is not None else {
        group: {name: torch.empty(shape, dtype=getattr(torch, dtype), device=runner.device)
                for name, (dtype, shape) in values.items()} for group, values in header["tensors"].items()}
    for group in sorted(groups):
        for name in sorted(groups[group]):
            runner.broadcast(groups[group][name], 0)
    return Saved(header["stage"], groups, header["state"])


class UnitCheckpoint:
    """`checkpoints/<unit>/` of the run directory, as a recipe sees it."""

    def __init__(self, run: RunDir, unit: str, runner: Collectives, progress: Progress,
                 table_shape: tuple[int, int]) -> None:
        self.run, self.unit, self.runner, self.progress = run, unit, runner, progress
        self.table_shape = table_shape  # [V, E]: a frozen table is rebuilt from its source, never saved

    def load(self, check: Callable[[Saved], None] | None = None) -> Saved | None:
        saved = self._read(check) if self.runner.rank == 0 else None
        if self.runner.world_size > 1:
            saved = _share_saved(self.runner, saved)
        return saved

    def _read(self, check: Callable[[Saved], None] | None) -> Saved | None:
        try:
            raw = self.run.load_checkpoint(self.unit, self.runner.device)
            saved = None if raw is None else Saved(*raw)
            if saved is not None and check is not None:
                check(saved)
            return saved
        except DAMAGED as error:
            why = " ".join(str(error).split()) or type(error).__name__  # one line, also for torch's messages
            self.progress.message(f"warning: {self.unit}: the checkpoint in {self.run.checkpoint_dir(self.unit)} "
                                  f"is unreadable ({why}); starting the unit over")
            self.run.drop_checkpoint(self.unit)
            return None

    def save(self, stage: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        if self.runner.rank == 0:
            self.run.save_checkpoint(self.unit, stage, tensors, state)
        self.runner.barrier()

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        skip = {p.data_ptr() for p in model.parameters() if not p.requires_grad and tuple(p.shape) == self.table_shape}
        return {k: v for k, v in model.state_dict().items() if v.data_ptr() not in skip}

    def file(self, name: str) -> Path:
        return self.run.inside(self.run.checkpoint_dir(self.unit) / name)

    def write_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        file = self.file(name)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.run.write_stream(file, write)

    def append(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """`write(handle)` at the end of this rank's file `name`, synced (see `RunDir.append_stream`)."""
        file = self.file(name)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.run.append_stream(file, write)

    def discard(self) -> None:
        self.run.drop_checkpoint(self.unit)
