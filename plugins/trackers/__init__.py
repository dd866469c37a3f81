"""Trackers: each unit's run mirrored to an experiment tracker (metrics.jsonl stays the record).

Entry-point modules: `tensorboard` (entry point `tensorboard_tracker`: event files, through tensorboardX or
torch.utils.tensorboard), `mlflow` (`mlflow_tracker`: an MLflow tracking store, by default SQLite in the
run directory) and `wandb` (`wandb_tracker`: Weights & Biases, offline by default). Each imports its
package only when a unit starts; `check()` names the extra to install where it is missing.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from newllm_kit.errors import ConfigError

ROW_KEYS = ("unit", "phase", "attempt")  # a metrics row's identity: the tracker run and tag say these


def require(tracker: str, modules: tuple[str, ...], extra: str) -> None:
    """A one-line ConfigError with the install command unless one of `modules` is importable here."""
    if not any(importlib.util.find_spec(module) is not None for module in modules):
        raise ConfigError(f"tracker {tracker!r} needs the {modules[0]} package, which is not installed here: "
                          f"pip install 'newllm-kit[{extra}]'")


def number(value: Any) -> float | None:
    """A value a tracker can chart (booleans as 0 or 1), or None for text, lists, and what metrics.jsonl
    writes as null (NaN, infinities)."""
    if isinstance(value, bool | int | float) and math.isfinite(value):
        return float(value)
    return None


def row_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers as `<phase>/<field>` (`lm/val_loss`): each phase's curves side by side."""
    phase = row.get("phase", "")
    values = {f"{phase}/{key}": number(value) for key, value in row.items() if key not in ROW_KEYS}
    return {key: value for key, value in values.items() if value is not None}


def record_values(record: dict[str, Any], prefix: str = "record/") -> dict[str, float]:
    """A results record's numbers as `record/<dotted key>` (`record/val_ppl`, `record/params.total`)."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(record_values(value, f"{prefix}{key}."))
        elif (as_number := number(value)) is not None:
            found[f"{prefix}{key}"] = as_number
    return found
