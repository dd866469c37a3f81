"""Per-document validation sums: what an evaluation adds up per validation document, and the file the
core keeps beside a unit's record (`documents/<unit>.json`), which `compare` resamples.

The rule: position i predicts token i + 1, so each scored position belongs to the document of the
token it predicts (the first document's first token is never predicted, so that document scores one
position fewer). The sums are exact: float64 NLL, whole hits and positions, and they add up to the
unit's totals. The file is JSON (floats round-trip exactly), never a pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rundir import RunDir
from .training import head_cross_entropy

FOLDER = "documents"
FORMAT = 1


@dataclass
class DocumentSums:
    """NLL sum, hits and scored positions per validation document: `sums` [D, 3] float64, beside the
    documents' first token positions `starts` [D]. `known` False: the stream stands for one document
    because the boundaries were not given, and the recipe reports no per-document sums."""

    starts: torch.Tensor
    sums: torch.Tensor
    known: bool

    @classmethod
    def of(cls, boundaries: np.ndarray | None, tokens: int, device: torch.device) -> DocumentSums:
        """Zero sums over the documents' [start, stop) spans ([D, 2]; None: one document of `tokens`)."""
        spans = np.asarray([[0, tokens]] if boundaries is None else boundaries, dtype=np.int64)
        return cls(torch.as_tensor(np.ascontiguousarray(spans[:, 0]), device=device),
                   torch.zeros(len(spans), 3, dtype=torch.float64, device=device), boundaries is not None)

    def empty(self) -> DocumentSums:
        """Zero sums over the same documents: one attempt of a pass, dropped if the pass is retried."""
        return DocumentSums(self.starts, torch.zeros_like(self.sums), self.known)

    def score(self, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              positions: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`head_cross_entropy` of the rows, one call per run of rows whose predicted tokens (stream
        `positions` [m], 1 … n−1) lie in one document, each run's sums added to its document's row.
        Returns the totals, as `head_cross_entropy` does."""
        document = torch.searchsorted(self.starts, positions.to(self.starts.device), right=True) - 1
        cuts = (torch.nonzero(document[1:] != document[:-1]).flatten() + 1).tolist()
        edges = [0, *cuts, int(positions.numel())]
        nll, hits, counts = [], [], []
        for lo, hi in pairwise(edges):
            loss, correct = head_cross_entropy(states[lo:hi], weight, bias, targets[lo:hi], chunk)
            nll.append(loss.double())
            hits.append(correct.double())
            counts.append(hi - lo)
        rows = torch.stack([torch.stack(nll), torch.stack(hits),
                            torch.tensor(counts, dtype=torch.float64, device=self.sums.device)], dim=1)
        self.sums.index_add_(0, document[torch.tensor(edges[:-1], device=document.device)], rows.to(self.sums))
        return rows[:, 0].sum(), rows[:, 1].sum().long()

    def result(self) -> np.ndarray | None:
        """The [D, 3] sums for `EvalOutputs.documents` (None where the documents were not known)."""
        return self.sums.cpu().numpy() if self.known else None


def problem(sums: Any, nll_sum: float, correct: int, count: int, documents: int | None = None) -> str | None:
    """Why `sums` cannot be a unit's per-document sums ([D, 3], adding up to the totals), or None."""
    array = np.asarray(sums)
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] == 0:
        return f"shape {array.shape}, not [documents, 3]"
    if documents is not None and array.shape[0] != documents:
        return f"{array.shape[0]:,} rows for {documents:,} validation documents"
    if not np.isfinite(array).all() or (array[:, 1:] < 0).any() or (array[:, 1] > array[:, 2]).any():
        return "a non-finite sum, a negative count, or more hits than positions"
    if array[:, 1:].sum(0).tolist() != [correct, count]:
        return f"hits and positions add up to {array[:, 1].sum():.0f} and {array[:, 2].sum():.0f}, not {correct} " \
               f"and {count}"
    if not math.isclose(math.fsum(array[:, 0]), nll_sum, rel_tol=1e-9, abs_tol=1e-9):
        return f"NLL adds up to {math.fsum(array[:, 0])!r}, not {nll_sum!r}"
    return None


def path(unit: str) -> str:
    """Where a unit's sums lie, relative to the run directory: what its record's `val_documents` says."""
    return f"{FOLDER}/{unit}.json"


def write(run: RunDir, unit: str, sums: np.ndarray) -> None:
    """Save a unit's sums atomically inside the run directory."""
    name = path(unit)
    body = {"format": FORMAT, "unit": unit, "nll": sums[:, 0].tolist(), "hits": sums[:, 1].astype(int).tolist(),
            "tokens": sums[:, 2].astype(int).tolist()}
    run.write_text(name, json.dumps(body, separators=(",", ":")) + "\n")


def read(folder: Path, record: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
    """The record's [D, 3] sums from `folder` (the run directory), or (None, a one-line warning) when
    the file is missing, outside the folder, damaged, or does not add up to the record's numbers."""
    name = record.get("val_documents")
    if not isinstance(name, str):
        return None, None
    file = folder / name
    where = f"{file}: per-document sums"
    fallback = "; compared on seeds only"
    if not file.resolve().is_relative_to(folder.resolve()):
        return None, f"{where} lie outside {folder}{fallback}"
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
        sums = np.stack([np.asarray(body[k], dtype=np.float64) for k in ("nll", "hits", "tokens")], axis=1)
    except (OSError, ValueError, KeyError, TypeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not a per-document file"
        return None, f"{where} unreadable ({why}){fallback}"
    tokens, ppl, acc = record.get("val_tokens"), record.get("val_ppl"), record.get("val_acc")
    if not isinstance(tokens, int) or not isinstance(ppl, int | float) or not isinstance(acc, int | float) \
            or not ppl > 0:
        return None, f"{where}: the record has no val_tokens, val_ppl and val_acc to check them by{fallback}"
    count = tokens - 1
    why = problem(sums, math.log(ppl) * count, round(acc * count), count)
    if why is not None:
        return None, f"{where} do not match the record ({why}){fallback}"
    return sums, None
