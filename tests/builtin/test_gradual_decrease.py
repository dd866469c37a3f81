"""The `gradual-decrease` solver: shrinking active set, linear schedules, and less work than `cvfp`."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from newllm_kit_plugins.cvfp import gradual_decrease
from newllm_kit_plugins.cvfp.contract import Phase1Report
from newllm_kit_plugins.cvfp.gradual_decrease import GradualDecreaseSettings, GradualDecreaseSolver
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from test_fixed_point import (  # noqa: F401
    WELL_CONDITIONED,
    CPURunner,
    RecordingProgress,
    TinyModel,
    one_thread,
    per_layer_rollout,
    spec_noise,
    tiny,
)


def fit(seed: int = 1, n: int = 48, **keys: Any) -> tuple[Phase1Report, Any]:
    model, ids = tiny(n=n)
    torch.manual_seed(seed)
    solver = GradualDecreaseSolver(GradualDecreaseSettings(**keys))
    return solver.fit(model, ids, CPURunner(), RecordingProgress()), model


def expected_active(report: Phase1Report, n: int, min_iterations: int) -> list[int]:
    """Active tokens per pass by the definition: all n until pass min_iterations − 1 is done; after it,
    n minus every token the previous pass counted as converged (the retired ones are counted too)."""
    active = [n]
    for k, entry in enumerate(report.history[:-1], start=1):
        active.append(n - round(entry["convergence_rate"] * n) if k + 1 >= min_iterations else n)
    return active


def stop_after(rates: list[float], s: CVFPPhase1Settings) -> int:
    """Iterations (iteration 0 included) that the stop rule gives for these pass rates."""
    for k, rate in enumerate(rates, start=1):
        if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
            return k + 1
    return s.max_iterations


def test_settings_extend_cvfp_and_register() -> None:
    s = GradualDecreaseSettings()
    own = {"lr_end_fraction", "noise_end_fraction"}
    assert s.model_dump(exclude=own) == CVFPPhase1Settings().model_dump()
    assert (s.lr_end_fraction, s.noise_end_fraction) == (0.1, 0.1)
    seen: dict[str, Any] = {}
    gradual_decrease.register_solvers(lambda name, factory, **kw: seen.update({name: (factory, kw)}))
    factory, kw = seen["gradual-decrease"]
    assert kw["settings"] is GradualDecreaseSettings and kw["description"]
    assert isinstance(factory(GradualDecreaseSettings()), GradualDecreaseSolver)


def test_fewer_token_evaluations_than_cvfp_on_the_same_data() -> None:
    keys = dict(init="random", batch_size=64, max_iterations=20)
    model, ids = tiny(n=256)
    torch.manual_seed(1)
    cvfp = CVFPPhase1Solver(CVFPPhase1Settings(**keys)).fit(model, ids, CPURunner(), RecordingProgress())
    model, ids = tiny(n=256)
    torch.manual_seed(1)
    settings = GradualDecreaseSettings(**keys)
    gradual = GradualDecreaseSolver(settings).fit(model, ids, CPURunner(), RecordingProgress())
    cvfp_rates = [h["convergence_rate"] for h in cvfp.history]
    assert cvfp.iterations == stop_after(cvfp_rates, CVFPPhase1Settings(**keys)) == len(cvfp_rates) + 1
    assert cvfp.token_evaluations == 256 * len(cvfp_rates)  # random init: no rollout, every token every pass
    rates, active = [h["convergence_rate"] for h in gradual.history], [int(h["active_tokens"]) for h in gradual.history]
    assert gradual.iterations == stop_after(rates, settings) == len(rates) + 1
    assert gradual.convergence_rate == rates[-1] >= 0.95
    assert active == expected_active(gradual, 256, settings.min_iterations)
    assert gradual.token_evaluations == sum(active)
    assert gradual.iterations < cvfp.iterations and 2 * gradual.token_evaluations < cvfp.token_evaluations


def test_learning_rate_and_noise_fall_linearly_over_the_budget() -> None:
    report, _ = fit(convergence_threshold=0.0, max_iterations=5, learning_rate=0.01, context_noise=0.2,
                    lr_end_fraction=0.25, noise_end_fraction=0.0)
    assert [h["learning_rate"] for h in report.history] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    assert [h["context_noise"] for h in report.history] == pytest.approx([0.2, 0.2 * 2 / 3, 0.2 / 3, 0.0])


def test_no_token_retires_before_min_iterations() -> None:
    """After a rollout iteration 0, pass 1 reports ≈100 % convergence (spec §3.3): nothing may retire yet.
    Pass 1's rate is recomputed here from the untrained block: the rollout P⁰ against one noisy pass."""
    model, ids = tiny(n=48)
    with torch.no_grad():
        rollout = per_layer_rollout(model, ids)[-1]
        incoming = torch.cat([rollout[-1:], rollout[:-1]]) + spec_noise(48, 4, 0.1, seed=1, iteration=1)
        block = model.context_block
        out = block.step(incoming, block.project_tokens(model.token_inputs(ids)))[-1]
    converged = int(((out - rollout) ** 2).mean(1).lt(0.03).sum())
    report, _ = fit(min_iterations=4, max_iterations=6, n=48)
    assert report.history[0]["convergence_rate"] == converged / 48
    active = [int(h["active_tokens"]) for h in report.history]
    assert active[:3] == [48, 48, 48]
    assert active == expected_active(report, 48, 4)  # retiring starts right after pass 3


def test_retired_tokens_keep_their_context() -> None:
    keys = dict(init="random", convergence_threshold=0.05, min_iterations=2, min_converged_ratio=1.0,
                lr_end_fraction=1.0, noise_end_fraction=1.0)  # constant schedules: budgets 4 and 5 agree
    shorter, _ = fit(max_iterations=4, **keys)
    longer, _ = fit(max_iterations=5, **keys)
    active = [int(h["active_tokens"]) for h in longer.history]
    assert active == expected_active(longer, 48, 2)
    assert 0 < active[-1] < 48  # the case this test is about: some tokens retired, some still moving
    unchanged = (shorter.contexts == longer.contexts).all(dim=1)
    assert int(unchanged.sum()) == 48 - active[-1]  # exactly the retired ones stayed put
    moved = (longer.contexts - shorter.contexts).pow(2).mean(1)  # the last pass's change P³ → O⁴; 0 if retired
    assert longer.history[-1]["convergence_rate"] == int((moved < 0.05).sum()) / 48


def previous_algorithm(model: TinyModel, ids: torch.Tensor, s: GradualDecreaseSettings, seed: int
                       ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The noise-free pass as it was before it became in-place: the active rows' token inputs,
    incoming contexts and targets gathered into new tensors, outputs scattered back, every pass."""
    torch.manual_seed(seed)
    block, tokens, n, w, tau = model.context_block, model.token_inputs(ids), ids.shape[0], s.dist_reg_weight, \
        s.convergence_threshold
    params = list(block.parameters())
    adam = torch.optim.Adam(params, lr=s.learning_rate)
    previous = per_layer_rollout(model, ids)[-1] if s.init == "rollout" else torch.randn(n, model.context_dim) * 0.01
    active, retired, history = torch.arange(n), 0, []
    for k in range(1, s.max_iterations):
        fraction = (k - 1) / max(s.max_iterations - 2, 1)
        for group in adam.param_groups:
            group["lr"] = s.learning_rate * (1 - fraction * (1 - s.lr_end_fraction))
        adam.zero_grad(set_to_none=True)
        inputs = torch.where((active == 0).unsqueeze(1), previous[-1:], previous[(active - 1).clamp(min=0)])
        x, targets, m = tokens[active], previous[active], active.shape[0]
        outputs, change = previous.new_empty(m, model.context_dim), previous.new_empty(m)
        bounds = [(a, min(a + s.batch_size, m)) for a in range(0, m, s.batch_size)]
        for a, b in bounds:
            out = block.step(inputs[a:b], block.project_tokens(x[a:b]))[-1]
            per_token = (out - targets[a:b]).pow(2).mean(1)
            loss = (1 - w) * per_token.mean() - w * (out - out.mean(0)).norm() / (b - a)
            (loss / len(bounds)).backward()
            outputs[a:b], change[a:b] = out.detach(), per_token.detach()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        adam.step()
        previous[active] = outputs
        converged = int((change < tau).sum())
        rate = (retired + converged) / n
        if k + 1 >= s.min_iterations:
            active, retired = active[~(change < tau)], retired + converged
        history.append({"convergence_rate": rate, "active_tokens": float(m)})
        if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
            break
    return previous, history


@pytest.mark.parametrize("init", ["rollout", "random"])
def test_the_in_place_pass_over_active_rows_equals_the_previous_algorithm_without_noise(init: str) -> None:
    """Retired rows leave gaps, so a chunk's first row may read an overwritten row (the kept
    previous context) or a retired one (unchanged): both as the gathered copies gave them."""
    model, ids = tiny(n=100)
    reference = copy.deepcopy(model)
    s = GradualDecreaseSettings(init=init, batch_size=16, max_iterations=12, min_iterations=3, context_noise=0.0,
                                convergence_threshold=0.01, solve="sequential")
    torch.manual_seed(7)
    report = GradualDecreaseSolver(s).fit(model, ids, CPURunner(), RecordingProgress())
    contexts, history = previous_algorithm(reference, ids, s, seed=7)
    assert len({h["active_tokens"] for h in history}) >= 3  # rows retired over several passes
    torch.testing.assert_close(report.contexts, contexts, atol=1e-6, rtol=0)
    for mine, theirs in zip(report.history, history, strict=True):
        assert {key: mine[key] for key in theirs} == pytest.approx(theirs, rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_stop_rule_is_cvfp_s() -> None:
    report, _ = fit(convergence_threshold=1e9, min_iterations=3)
    assert report.iterations == 3 and report.convergence_rate == 1.0
    report, _ = fit(convergence_threshold=0.0, max_iterations=4)
    assert report.iterations == 4 and [h["active_tokens"] for h in report.history] == [48, 48, 48]


def test_solve_is_the_cvfp_frozen_solve() -> None:
    model, ids = tiny(n=300, **WELL_CONDITIONED)
    mine = GradualDecreaseSolver(GradualDecreaseSettings()).solve(model, ids, CPURunner())
    theirs = CVFPPhase1Solver(CVFPPhase1Settings()).solve(model, ids, CPURunner())
    assert mine.method == theirs.method
    assert all(torch.equal(a, b) for a, b in zip(mine.layers, theirs.layers, strict=True))
