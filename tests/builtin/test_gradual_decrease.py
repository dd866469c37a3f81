"""The `gradual-decrease` solver: shrinking active set, linear schedules, and less work than `cvfp`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from newllm_kit_plugins import gradual_decrease
from newllm_kit_plugins.fixed_point import CVFPSolver, CVFPSolverSettings
from newllm_kit_plugins.gradual_decrease import GradualDecreaseSettings, GradualDecreaseSolver
from test_fixed_point import WELL_CONDITIONED, CPURunner, RecordingProgress, one_thread, tiny  # noqa: F401

from newllm_kit.protocols import Phase1Report


def fit(seed: int = 1, n: int = 48, **keys: Any) -> tuple[Phase1Report, Any]:
    model, x = tiny(n=n)
    torch.manual_seed(seed)
    solver = GradualDecreaseSolver(GradualDecreaseSettings(**keys))
    return solver.fit(model, x, CPURunner(), RecordingProgress()), model


def test_settings_extend_cvfp_and_register() -> None:
    s = GradualDecreaseSettings()
    own = {"lr_end_fraction", "noise_end_fraction"}
    assert s.model_dump(exclude=own) == CVFPSolverSettings().model_dump()
    assert (s.lr_end_fraction, s.noise_end_fraction) == (0.1, 0.1)
    seen: dict[str, Any] = {}
    gradual_decrease.register_solvers(lambda name, factory, **kw: seen.update({name: (factory, kw)}))
    factory, kw = seen["gradual-decrease"]
    assert kw["settings"] is GradualDecreaseSettings and kw["description"]
    assert isinstance(factory(GradualDecreaseSettings()), GradualDecreaseSolver)


def test_fewer_token_evaluations_than_cvfp_on_the_same_data() -> None:
    keys = dict(init="random", batch_size=64, max_iterations=20)
    model, x = tiny(n=256)
    torch.manual_seed(1)
    cvfp = CVFPSolver(CVFPSolverSettings(**keys)).fit(model, x, CPURunner(), RecordingProgress())
    model, x = tiny(n=256)
    torch.manual_seed(1)
    solver = GradualDecreaseSolver(GradualDecreaseSettings(**keys))
    gradual = solver.fit(model, x, CPURunner(), RecordingProgress())
    assert gradual.convergence_rate >= 0.95 and gradual.iterations < cvfp.iterations
    assert 2 * gradual.token_evaluations < cvfp.token_evaluations
    assert gradual.token_evaluations == sum(h["active_tokens"] for h in gradual.history)  # random init


def test_learning_rate_and_noise_fall_linearly_over_the_budget() -> None:
    report, _ = fit(convergence_threshold=0.0, max_iterations=5, learning_rate=0.01, context_noise=0.2,
                    lr_end_fraction=0.25, noise_end_fraction=0.0)
    assert [h["learning_rate"] for h in report.history] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    assert [h["context_noise"] for h in report.history] == pytest.approx([0.2, 0.2 * 2 / 3, 0.2 / 3, 0.0])


def test_no_token_retires_before_min_iterations() -> None:
    """After a rollout iteration 0, pass 1 reports ≈100 % convergence (spec §3.3): nothing may retire yet."""
    report, _ = fit(min_iterations=4, max_iterations=6, n=48)
    assert report.history[0]["convergence_rate"] > 0.8
    assert [h["active_tokens"] for h in report.history[:3]] == [48, 48, 48]


def test_retired_tokens_keep_their_context() -> None:
    keys = dict(init="random", convergence_threshold=0.05, min_iterations=2, min_converged_ratio=1.0,
                lr_end_fraction=1.0, noise_end_fraction=1.0)  # constant schedules: budgets 4 and 5 agree
    shorter, _ = fit(max_iterations=4, **keys)
    longer, _ = fit(max_iterations=5, **keys)
    active_last = int(longer.history[-1]["active_tokens"])
    assert 0 < active_last < 48
    unchanged = (shorter.contexts == longer.contexts).all(dim=1)
    assert int(unchanged.sum()) == 48 - active_last  # exactly the retired ones stayed put
    assert longer.history[-1]["convergence_rate"] >= (48 - active_last) / 48


def test_stop_rule_is_cvfp_s() -> None:
    report, _ = fit(convergence_threshold=1e9, min_iterations=3)
    assert report.iterations == 3 and report.convergence_rate == 1.0
    report, _ = fit(convergence_threshold=0.0, max_iterations=4)
    assert report.iterations == 4 and [h["active_tokens"] for h in report.history] == [48, 48, 48]


def test_solve_is_the_cvfp_frozen_solve() -> None:
    model, x = tiny(n=300, **WELL_CONDITIONED)
    mine = GradualDecreaseSolver(GradualDecreaseSettings()).solve(model, x, CPURunner())
    theirs = CVFPSolver(CVFPSolverSettings()).solve(model, x, CPURunner())
    assert mine.method == theirs.method
    assert all(torch.equal(a, b) for a, b in zip(mine.layers, theirs.layers, strict=True))
