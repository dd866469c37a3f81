"""What a cvfp checkpoint must hold before the recipe resumes from it: every field is checked before any
is used, so a damaged or foreign checkpoint is reported and its unit restarted instead of failing later,
after hours of work (the core turns the ValueError raised here into "damaged")."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from newllm_kit.protocols import Saved
from newllm_kit.training import TrainState

from .contract import CVFPModel
from .diagnostics import diagnostic_warnings
from .phase2 import Phase2Settings, phase2_optimizer

PHASE1_KEYS = {"iterations", "convergence_rate", "token_evaluations", "seconds", "train_er"}


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def check_phase1(summary: Any) -> None:
    """Raise ValueError unless `summary` is a Phase-1 summary as the recipe's Phase-1 stage writes it:
    the record and the notes read every field, so a wrong type would fail there, after Phase 2."""
    if not isinstance(summary, dict) or not PHASE1_KEYS <= summary.keys():
        raise ValueError("its phase-1 summary is incomplete")

    def number(key: str, high: float = math.inf, nan: bool = False, integer: bool = False) -> bool:
        value = summary.get(key)
        if nan and (value is None or (isinstance(value, float) and math.isnan(value))):
            return True  # no effective-rank metric: NaN (null where it was written as strict JSON)
        kinds = int if integer else int | float
        return isinstance(value, kinds) and not isinstance(value, bool) and 0 <= value <= high and math.isfinite(value)

    stopped = summary.get("stopped_by")
    checks = {"iterations": number("iterations", integer=True),
              "token_evaluations": number("token_evaluations", integer=True),
              "convergence_rate": number("convergence_rate", 1.0), "seconds": number("seconds"),
              "train_er": number("train_er", 1.0, nan=True),
              "stopped_by": stopped in (None, "converged", "max_iterations"),
              "target_rate": number("target_rate", 1.0) or (summary.get("target_rate") is None
                                                            and stopped != "max_iterations")}
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"its phase-1 summary has {bad[0]} = {summary.get(bad[0])!r}")


def check_checked(checked: Any) -> None:
    """Raise ValueError unless `checked` holds diagnostics and a context agreement as `_diagnose` keeps
    them: the warnings and the results read every field."""
    if not isinstance(checked, dict) or set(checked) != {"diagnostics", "agreement"}:
        raise ValueError("its diagnostics are incomplete")
    values, agreement = checked["diagnostics"], checked["agreement"]
    try:
        diagnostic_warnings(values)
        valid = isinstance(values["identity"]["identity"], bool) and isinstance(values["contexts"], dict)
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError("its diagnostics are damaged")
    if agreement is not None and not (isinstance(agreement, dict) and all(
            isinstance(agreement.get(k), int | float) for k in ("tokens", "mean_cosine", "min_cosine", "mse"))):
        raise ValueError("its context agreement is damaged")


def check_checkpoint(model: nn.Module, expected: dict[str, Any], p2: Phase2Settings, saved: Saved) -> None:
    """A checkpoint fits when every field does before any is used: its stage and groups, its weights
    (this model's names, shapes and dtypes, finite), its Phase-1 summary, and a Phase-2 state that
    continues these [phase2] settings (`TrainState.check_resume`)."""
    layout = {"phase1": [({"model"}, {"phase1"})], "checked": [({"model"}, {"phase1", "checked"})],
              "phase2": [({"model", "phase2"}, {"phase1", "checked", "phase2"}),
                         ({"model", "phase2"}, {"phase1", "phase2"})]}  # the second: before diagnostics were kept
    if (set(saved.tensors), set(saved.state)) not in layout.get(saved.stage, []):  # (tensor groups, state keys)
        raise ValueError(f"its stage {saved.stage!r} does not match its groups {sorted(saved.tensors)} "
                         f"and state {sorted(saved.state)}")
    weights = saved.tensors["model"]
    if shapes(weights) != expected:
        raise ValueError("its weights do not fit the model")
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        raise ValueError("its weights hold NaN or infinite values")
    check_phase1(saved.state["phase1"])
    if "checked" in saved.state:
        check_checked(saved.state["checked"])
    if "phase2" in saved.state:
        params, optimizer = phase2_optimizer(cast(CVFPModel, model), p2)
        TrainState.from_checkpoint(saved.tensors["phase2"], saved.state["phase2"]).check_resume(
            model, params, optimizer, epochs=p2.epochs, patience=p2.patience, restore_best=p2.restore_best)
