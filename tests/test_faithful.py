"""Runs as the reference ran them: fp32 without TF32, split-mode Phase 1, and true trainable counts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_cuda import FakeCuda
from newllm_kit_plugins.cvfp.contract import Phase1Report, SolveResult
from newllm_kit_plugins.cvfp.frozen_solve import solve_frozen
from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from newllm_kit_plugins.cvfp.split_phase1 import SplitModeSolver, phase1_solver, split_ids
from newllm_kit_plugins.runners.local import CPURunner
from test_experiment import TINY, read_results, write_tiny

from newllm_kit.config import load_config
from newllm_kit.plugins import load_plugins
from newllm_kit.progress import NullProgress
from newllm_kit.run import execute

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SEED_FILES = ("2025-11-27-3L.toml", "2025-11-27-6L.toml", "v1.toml", "v2.toml")


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_reproductions_run_fp32_matmuls_without_tf32(name: str, fake_cuda: FakeCuda) -> None:
    """The runner the file builds, set up on a (fake) GPU, turns TF32 off and autocasts nothing."""
    runner = load_config(EXPERIMENTS / name, load_plugins().registry).runner.build()
    runner.setup()
    try:
        assert str(runner.device) == "cuda:0" and runner.precision == "fp32"
        assert [call for call in fake_cuda.calls if call[0] == "set_tf32"] == [("set_tf32", False)]
        # torch.autocast("cuda") switches itself off without a real GPU, so ask what the runner opens
        assert type(runner.autocast()) is contextlib.nullcontext
    finally:
        runner.teardown()


def split_model(**settings: Any) -> Any:
    torch.manual_seed(0)
    cfg = CVFPSettings(layers=2, context_dim=8, embedding_dim=4, num_context_splits=2, **settings)
    return CVFPArchitecture(cfg).build(30)


BOUNDARIES = np.array([[0, 5], [5, 9], [9, 16], [16, 20], [20, 27]])
IDS = torch.arange(27) % 30


class Recording:
    """A solver that records what each `fit` was given and solves by the sequential rollout."""

    def __init__(self) -> None:
        self.fits: list[tuple[Any, torch.Tensor]] = []

    def fit(self, model: Any, ids: torch.Tensor, runner: Any, progress: Any) -> Phase1Report:
        self.fits.append((model, ids))
        n = ids.shape[0]
        return Phase1Report(3, 0.5, n, 3 * n, 0.0, torch.zeros(n, model.context_dim), target_rate=0.95,
                            converged=False)

    def solve(self, model: Any, ids: torch.Tensor, runner: Any, out: torch.Tensor | None = None) -> SolveResult:
        with torch.no_grad():
            return solve_frozen(model, ids, "sequential", 1e-5, out)


def test_each_split_trains_alone_on_its_own_samples() -> None:
    model, inner = split_model(), Recording()
    report = SplitModeSolver(inner, BOUNDARIES).fit(model, IDS, CPURunner(), NullProgress())
    (view0, ids0), (view1, ids1) = inner.fits
    assert torch.equal(ids0, torch.cat([IDS[0:5], IDS[9:16], IDS[20:27]])) and torch.equal(ids1, split_ids(
        IDS, BOUNDARIES, 1, 2)) and torch.equal(ids1, torch.cat([IDS[5:9], IDS[16:20]]))
    assert view0.context_dim == view1.context_dim == 4
    own = [{id(p) for p in view.param_groups()["phase1"]} for view in (view0, view1)]
    assert not own[0] & own[1] and own[0] | own[1] == {id(p) for p in model.param_groups()["phase1"]}
    # the training contexts: one noise-free pass of the merged block over the whole stream, from zero
    with torch.no_grad():
        assert torch.equal(report.contexts, solve_frozen(model, IDS, "sequential", 1e-5).layers[-1])
    assert (report.iterations, report.tokens, report.convergence_rate, report.converged) == (3, 27, 0.5, False)


def test_a_split_view_is_the_merged_blocks_slice() -> None:
    model = split_model()
    x, context = model.token_inputs(IDS[:6]), torch.randn(6, 8)
    merged = model.context_block(context, x)
    for s, view in enumerate(model.split_views()):
        alone = view.context_block(context[:, 4 * s:4 * (s + 1)], view.token_inputs(IDS[:6]))
        for layer, whole, width in zip(alone, merged, model.config.split_layer_widths, strict=True):
            assert torch.allclose(layer, whole[:, s * width:(s + 1) * width])


def test_real_solver_trains_both_splits() -> None:
    model = split_model()
    before = [p.detach().clone() for p in model.param_groups()["phase1"]]
    settings = CVFPPhase1Settings(min_iterations=2, max_iterations=3, batch_size=64, solve="sequential")
    solver = phase1_solver(CVFPPhase1Solver(settings), model, BOUNDARIES)
    report = solver.fit(model, IDS, CPURunner(), NullProgress())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.param_groups()["phase1"], strict=True))
    assert report.contexts.shape == (27, 8) and len(report.extra["splits"]) == 2


def test_joint_training_and_one_split_keep_the_plain_solver() -> None:
    solver = CVFPPhase1Solver()
    assert phase1_solver(solver, split_model(split_training="joint"), BOUNDARIES) is solver
    assert phase1_solver(solver, CVFPArchitecture(CVFPSettings(layers=1, context_dim=4, embedding_dim=4)).build(9),
                         BOUNDARIES) is solver


def test_an_untied_models_table_is_not_counted_as_trained() -> None:
    """Token inputs are computed without gradients, so only a tied table (the output head) can train."""
    for tie_head in (False, True):
        torch.manual_seed(0)
        model = CVFPArchitecture(CVFPSettings(layers=1, context_dim=4, embedding_dim=4, tie_head=tie_head)).build(9)
        model.set_embedding(torch.randn(9, 4), freeze=False)
        trained = {id(p) for p in model.param_groups()["phase2"]}
        assert (id(model.embedding.weight) in trained) is tie_head


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("faithful")
    model = ('models=[{label = "A", variant = "gradual-reduction", layers = 1, context_dim = 8, embedding_dim = 8, '
             'num_context_splits = 2, tie_head = false}]')
    overrides = [model, "experiment.samples=[12]", "phase2.epochs=1", "embedding.freeze=false",
                 "solver.val_convergence_trials=2"]
    result = execute(write_tiny(tmp, TINY), overrides, tmp / "runs", False, "none", load_plugins())
    return read_results(Path(result["run_dir"]))[0]


def test_a_run_trains_each_split_on_its_samples(record: dict[str, Any]) -> None:
    splits = record["phase1_splits"]
    assert len(splits) == 2 and sum(s["tokens"] for s in splits) == record["train_tokens"]


def test_the_recorded_phase_2_count_is_what_trains(record: dict[str, Any]) -> None:
    params = record["params"]
    assert params["trainable"]["phase2"] == params["token_block"] + params["head"]
