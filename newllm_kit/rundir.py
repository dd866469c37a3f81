"""The run directory: atomic writes, per-unit checkpoints, and resume.

Every file a reader may open is written to a temporary name in the same folder and renamed
into place, so a run killed at any instant leaves either the old or the new version, never
half a file. Checkpoints are folders, published by atomically rewriting a `LATEST` pointer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

RESULT_CSV_COLUMNS = ("model", "samples", "train_tokens", "val_tokens", "val_ppl", "val_acc", "train_er",
                      "val_er", "phase1_iterations", "convergence_rate", "best_epoch")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunDir:
    """One run of one experiment file: `runs/<experiment>/<timestamp>-<id>/`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path, experiment: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / experiment / f"{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=False)
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        if not (path / "config.resolved.toml").is_file():
            raise UserError(f"{path}: not a run directory (no config.resolved.toml); pass the folder "
                            f"`newllm-kit run` printed, e.g. runs/<experiment>/<timestamp>-<id>")
        return cls(path)

    # -- records ------------------------------------------------------------------------------
    def results(self) -> list[dict[str, Any]]:
        file = self.path / "results.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_results(self, records: list[dict[str, Any]]) -> None:
        """Rewrite results.jsonl and results.csv whole (they are small) so neither is ever partial."""
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.path / "results.jsonl", lines)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(RESULT_CSV_COLUMNS), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "model": r["model"]} for r in records)
        atomic_write_text(self.path / "results.csv", buffer.getvalue())

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one per-iteration/per-epoch line; a line cut by a kill is skipped on read."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    # -- checkpoints --------------------------------------------------------------------------
    def _unit_dir(self, unit: str) -> Path:
        return self.path / "checkpoints" / unit

    def save_checkpoint(self, unit: str, stage: str, tensors: dict[str, torch.Tensor],
                        state: dict[str, Any]) -> None:
        """Write a complete checkpoint folder, then publish it by rewriting LATEST atomically.

        A process killed mid-write leaves at most an unpublished folder, which LATEST never names
        and the next save removes."""
        unit_dir = self._unit_dir(unit)
        unit_dir.mkdir(parents=True, exist_ok=True)
        final = unit_dir / f"{stage}-{secrets.token_hex(3)}"
        tmp = unit_dir / f".{final.name}.tmp"
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        os.replace(tmp, final)
        atomic_write_text(unit_dir / "LATEST", final.name)
        for stale in unit_dir.iterdir():  # the previous checkpoint, and leftovers of a killed writer
            if stale.is_dir() and stale != final:
                shutil.rmtree(stale, ignore_errors=True)

    def _latest(self, unit: str) -> Path | None:
        pointer = self._unit_dir(unit) / "LATEST"
        if not pointer.exists():
            return None
        folder = self._unit_dir(unit) / pointer.read_text(encoding="utf-8").strip()
        return folder if folder.is_dir() else None

    def load_checkpoint(self, unit: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
        folder = self._latest(unit)
        if folder is None:
            return None
        stage = folder.name.rsplit("-", 1)[0]
        tensors = load_file(str(folder / "model.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=False)
        return stage, tensors, state

    def drop_checkpoint(self, unit: str) -> None:
        shutil.rmtree(self._unit_dir(unit), ignore_errors=True)
