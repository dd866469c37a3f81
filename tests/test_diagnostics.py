"""The seed's diagnostics (spec §3.6, §5): computed after Phase 1 and recorded per unit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from newllm_kit_plugins.cvfp import diagnostics
from newllm_kit_plugins.cvfp.diagnostics import classify_trials, context_stats, convergence_check, identity_check
from newllm_kit_plugins.cvfp.frozen_solve import solve_frozen
from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings
from scipy.spatial.distance import pdist
from test_experiment import TINY, read_results, write_tiny

from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute

ONE_MODEL = ['models=[{label = "A", variant = "gradual-reduction", layers = 1, context_dim = 8, embedding_dim = 8}]',
             "experiment.samples=[12]", "phase2.epochs=1"]


def tiny_model(**settings: Any) -> Any:
    torch.manual_seed(0)
    return CVFPArchitecture(CVFPSettings(layers=2, context_dim=8, embedding_dim=8, **settings)).build(40)


@pytest.mark.parametrize(("losses", "status"), [
    ([0.5, 0.3, 0.1], "CONVERGING"),
    ([1e-5, 0.0, 0.0, 0.0], "CONVERGED"),
    ([0.1, 0.3, 0.5], "DIVERGING"),
    ([0.0, 0.05, 0.0, 0.05, 0.0], "UNSTABLE"),  # flat slope, std 0.024 ≥ 0.01
    ([0.1], "INSUFFICIENT_DATA"),
])
def test_trials_are_classified_by_slope_and_std(losses: list[float], status: str) -> None:
    assert classify_trials(losses) == status


class IdentityBlock(torch.nn.Module):
    """F(c, x) = c: the degenerate block the reference refused to train Phase 2 on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        return [context + 0 * projected[:, :1]]


def test_identity_check_flags_a_block_that_returns_its_context() -> None:
    model = tiny_model()
    model.context_block = IdentityBlock()
    assert identity_check(model, seed=0) == {"mean_cosine": pytest.approx(1.0), "identity": True}
    model = tiny_model()
    # the reference: the seeded probes drawn as the check documents (contexts, then token inputs), one
    # step of the block, and the mean row-wise cosine written out in numpy
    generator = torch.Generator().manual_seed(0)
    probes = torch.randn(diagnostics.IDENTITY_PROBES, model.context_dim, generator=generator)
    tokens = torch.randn(diagnostics.IDENTITY_PROBES, model.token_width, generator=generator)
    with torch.no_grad():
        out = model.context_block.step(probes, model.context_block.project_tokens(tokens))[-1].double().numpy()
    before = probes.double().numpy()
    cosine = ((before * out).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(out, axis=1)).mean()
    assert identity_check(model, seed=0) == {"mean_cosine": pytest.approx(cosine, abs=1e-6), "identity": False}


def test_context_stats_flag_zero_solutions_and_global_attractors() -> None:
    rank_two = torch.cat([torch.eye(2, 6) * 3, torch.eye(2, 6) * 3, torch.eye(2, 6) * 3])
    stats = context_stats(rank_two, seed=0)
    assert stats["actual_rank"] == 2 and stats["sparsity"] == pytest.approx(30 / 36)
    assert stats["mean_row_norm"] == pytest.approx(3.0)
    assert not stats["zero_solution"] and not stats["global_attractor"]
    assert context_stats(torch.full((50, 4), 1e-3), seed=0)["zero_solution"]
    near_one_point = torch.ones(50, 4) + 1e-4 * torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    same = context_stats(near_one_point, seed=0)
    assert same["global_attractor"] and not same["zero_solution"]
    assert same["mean_pairwise_distance"] == pytest.approx(pdist(near_one_point.double().numpy()).mean(), rel=1e-5)


def test_context_stats_match_numpy_and_scipy_references() -> None:
    """Rank 4 of 6 columns (3 random directions and one constant), signed values, two columns below the
    sparsity threshold: each statistic against an independent formula (numpy, scipy's pairwise distances)."""
    rng = np.random.default_rng(0)
    x = np.hstack([rng.normal(size=(40, 3)) @ rng.normal(size=(3, 4)), np.full((40, 2), -0.005)])
    stats = context_stats(torch.from_numpy(x), seed=0)
    assert stats["rows"] == 40 and stats["actual_rank"] == np.linalg.matrix_rank(x, tol=1e-6) == 4
    assert stats["sparsity"] == float((np.abs(x) < 0.01).mean()) == 80 / 240
    assert stats["mean_row_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-12)
    assert stats["mean_pairwise_distance"] == pytest.approx(pdist(x).mean(), rel=1e-9)
    assert stats["mean_pairwise_cosine"] == pytest.approx(1 - pdist(x, "cosine").mean(), rel=1e-9)


def test_context_stats_sample_at_most_5000_rows_with_the_seed() -> None:
    contexts = torch.randn(6000, 3)
    first = context_stats(contexts, seed=1)
    assert first["rows"] == 5000 and first == context_stats(contexts, seed=1)
    assert first != context_stats(contexts, seed=2)


def test_convergence_trials_start_where_the_previous_trial_ended() -> None:
    model = tiny_model()
    ids = torch.randint(0, 40, (60,), generator=torch.Generator().manual_seed(0))
    check = convergence_check(model, ids, trials=4)
    # trial 1 is the sequential solve from zeros; every later trial is the rollout from the last context
    # of the one before, and the history is the MSE of each trial against the previous one
    with torch.no_grad():
        trials = [solve_frozen(model, ids, "sequential", 1e-5).layers[-1]]
        projected = model.context_block.project_tokens(model.token_inputs(ids))
        for _ in range(3):
            context, rows = trials[-1][-1:], []
            for i in range(ids.shape[0]):
                context = model.context_block.step(context, projected[i:i + 1])[-1]
                rows.append(context[0])
            trials.append(torch.stack(rows))
    expected = [float(((b.double() - a.double()) ** 2).mean()) for a, b in itertools.pairwise(trials)]
    assert check["history"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert check["first_loss"] == check["history"][0] and check["last_loss"] == check["history"][-1]
    assert check["status"] == classify_trials(expected)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("diagnostics")
    result = execute(write_tiny(tmp, TINY), ONE_MODEL, tmp / "runs", False, "none", load_plugins())
    return read_results(Path(result["run_dir"]))[0]


def test_each_record_holds_the_seeds_diagnostics(recorded: dict[str, Any]) -> None:
    found = recorded["diagnostics"]
    assert set(found) == {"identity", "val_convergence", "contexts", "gain"}
    assert found["identity"]["identity"] is False
    assert found["val_convergence"]["trials"] == 3 and len(found["val_convergence"]["history"]) == 2
    for stream in ("train", "val"):
        stats = found["contexts"][stream]
        # every row of the stream is kept (fewer than 5,000), and a random 8-wide block's contexts span all 8
        assert stats["rows"] == recorded[f"{stream}_tokens"] and stats["actual_rank"] == 8
        assert stats["zero_solution"] is False and stats["global_attractor"] is False
    assert found["gain"]["train"] == recorded["solve"]["gain"]  # ρ as the frozen solve measured it
    # both solves measured ρ ≥ 1 (a trained block), and the note says the recorded values
    note = next(n for n in recorded["notes"] if n.startswith("the frozen ContextBlock does not contract"))
    for stream in ("train", "val"):
        assert found["gain"][stream] >= 1 and f"{found['gain'][stream]:.3g} on {stream}" in note
    assert recorded["phase2_skipped"] is False


def test_an_identity_block_is_recorded_and_phase_2_skipped_only_when_asked(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnostics, "IDENTITY_THRESHOLD", -1.0)  # every block counts as an identity
    path = write_tiny(tmp_path, TINY)
    overrides = [*ONE_MODEL, "solver.val_convergence_trials=0"]
    warned = read_results(Path(execute(path, overrides, tmp_path / "a", False, "none", load_plugins())["run_dir"]))
    assert warned[0]["phase2_skipped"] is False and warned[0]["epochs_run"] == 1
    assert any("identity mapping" in note for note in warned[0]["notes"])
    skip = [*overrides, "solver.skip_phase2_if_identity=true"]
    skipped = read_results(Path(execute(path, skip, tmp_path / "b", False, "none", load_plugins())["run_dir"]))[0]
    assert skipped["phase2_skipped"] is True and skipped["epochs_run"] == 0 and skipped["val_ppl"] is None
    assert skipped["diagnostics"]["val_convergence"] is None
    assert "Phase 2 skipped (solver.skip_phase2_if_identity)" in skipped["notes"]
    assert json.loads(json.dumps(skipped["diagnostics"])) == skipped["diagnostics"]
