"""The built-in metrics (spec §5): PPL, accuracy, effective rank (seeded sampling), convergence rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from newllm_kit_plugins.metrics import (
    Accuracy,
    ConvergenceRate,
    EffectiveRank,
    EffectiveRankSettings,
    Perplexity,
    effective_rank,
)

from newllm_kit.plugins import load_plugins
from newllm_kit.protocols import EvalOutputs


@pytest.mark.parametrize("vocab", [2, 17, 50257])
def test_ppl_of_uniform_logits_is_the_vocabulary_size(vocab: int) -> None:
    targets = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(0))
    nll = F.cross_entropy(torch.zeros(64, vocab, dtype=torch.float64), targets, reduction="sum")
    outputs = EvalOutputs(nll_sum=float(nll), count=64)
    assert Perplexity().compute(outputs) == pytest.approx(vocab, rel=1e-12)


def test_ppl_and_accuracy_of_counts() -> None:
    outputs = EvalOutputs(nll_sum=8 * math.log(3.0), correct=3, count=8)
    assert Perplexity().compute(outputs) == pytest.approx(3.0)
    assert Accuracy().compute(outputs) == 3 / 8
    assert math.isnan(Accuracy().compute(EvalOutputs())) and math.isnan(Perplexity().compute(EvalOutputs()))
    assert Perplexity().compute(EvalOutputs(nll_sum=1e6, count=1)) == math.inf


@pytest.mark.parametrize("n", [1, 5, 64])
def test_effective_rank_of_identity_is_its_size(n: int) -> None:
    assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-6)


def test_effective_rank_of_rank_one_matrix_is_one() -> None:
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(200, 1, generator=g) @ torch.randn(1, 32, generator=g)
    assert effective_rank(matrix) == pytest.approx(1.0, abs=1e-4)


def numpy_effective_rank(matrix: torch.Tensor) -> float:
    """exp of the Shannon entropy of the singular values (not their squares) normalised to sum 1."""
    s = np.linalg.svd(matrix.numpy(), compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_is_uncentred_and_scale_free() -> None:
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(300, 16, generator=g, dtype=torch.float64)
    assert effective_rank(matrix) == pytest.approx(numpy_effective_rank(matrix), rel=1e-8)
    assert effective_rank(matrix * 7.5) == pytest.approx(effective_rank(matrix), rel=1e-9)
    shifted = matrix + 20.0  # a common mean direction dominates the uncentred spectrum
    assert effective_rank(shifted) == pytest.approx(numpy_effective_rank(shifted), rel=1e-8)
    centred = numpy_effective_rank(shifted - shifted.mean(0))
    assert numpy_effective_rank(shifted) < 0.5 * centred  # so the data tells uncentred from centred
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(torch.zeros(0, 3))


def test_effective_rank_sampling_is_seeded_and_leaves_the_global_rng_alone() -> None:
    matrix = torch.randn(500, 24, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 24)
    global_state = torch.get_rng_state()
    first = effective_rank(matrix, max_rows=40, seed=5)
    torch.manual_seed(999)  # the global RNG must not matter
    assert effective_rank(matrix, max_rows=40, seed=5) == first
    assert effective_rank(matrix, max_rows=40, seed=6) != first
    assert effective_rank(matrix, max_rows=500, seed=5) == effective_rank(matrix, max_rows=500, seed=6)
    torch.set_rng_state(global_state)


def test_effective_rank_metric_is_a_fraction_of_the_width() -> None:
    metric = EffectiveRank()
    assert (metric.name, metric.direction, metric.unit) == ("effective_rank", "max", "fraction of width")
    full = metric.compute(EvalOutputs(extras={"contexts": torch.eye(8), "context_width": 8}))
    assert full == pytest.approx(1.0, rel=1e-6)
    wide = torch.cat([torch.eye(8), torch.zeros(8, 8)], dim=1)
    half = metric.compute(EvalOutputs(extras={"contexts": wide, "context_width": 16}))
    assert half == pytest.approx(0.5, rel=1e-6)
    assert math.isnan(metric.compute(EvalOutputs()))
    sampled = EffectiveRank(EffectiveRankSettings(max_rows=3))
    outputs = EvalOutputs(seed=1, extras={"contexts": torch.eye(8), "context_width": 8})
    assert sampled.compute(outputs) == pytest.approx(3 / 8, rel=1e-6)


def test_convergence_rate_passes_through() -> None:
    assert ConvergenceRate().compute(EvalOutputs(extras={"convergence_rate": 0.97})) == 0.97
    assert math.isnan(ConvergenceRate().compute(EvalOutputs()))


def test_metrics_register_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWLLM_KIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("NEWLLM_KIT_PLUGINS", "metrics")
    registry = load_plugins().registry
    expected = {"ppl": ("min", "perplexity"), "accuracy": ("max", "fraction"),
                "effective_rank": ("max", "fraction of width"), "convergence_rate": ("max", "fraction of tokens")}
    assert set(registry.names("metric")) == set(expected)
    for name, (direction, unit) in expected.items():
        component = registry.get("metric", name)
        metric = component.factory(component.settings() if component.settings else None)
        assert (metric.name, metric.direction, metric.unit) == (name, direction, unit)
    assert registry.get("metric", "effective_rank").settings is EffectiveRankSettings
