"""`phase2.train_contexts = "phase1"`: Phase 2 reads F(P_{i−1}, x_i) of Phase 1's final contexts P,
with no rollout over the training stream, and every unit records how far that is from the rollout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from newllm_kit_plugins.cvfp.phase2 import Phase2Data, context_agreement
from newllm_kit_plugins.runners.local import CPURunner
from test_experiment import without_timings, write_tiny

from newllm_kit.errors import RunInterrupted
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute

ONE_MODEL = 'models=[{label = "A", variant = "gradual-reduction", layers = 2, context_dim = 16, embedding_dim = 16}]'
FAST = ["phase2.train_contexts=\"phase1\"", "experiment.samples=[24]", ONE_MODEL]


def run(tmp_path: Path, overrides: list[str], resume: bool = False) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return execute(write_tiny(tmp_path), overrides, tmp_path / "runs", resume, "none", load_plugins())


def test_the_agreement_of_the_rollout_with_itself_is_exact() -> None:
    torch.manual_seed(0)
    model = CVFPArchitecture(CVFPSettings(layers=2, context_dim=16, embedding_dim=16)).build(50)
    ids = torch.randint(0, 50, (300,), dtype=torch.int32)
    rollout = CVFPPhase1Solver(CVFPPhase1Settings(solve="sequential")).solve(model, ids, CPURunner()).layers[-1]
    # F(c_{i−1}, x_i) of the rollout's own contexts is the rollout: cosine 1, no error.
    same = context_agreement(model, Phase2Data(rollout, ids), rollout[:200], torch.device("cpu"))
    assert same["tokens"] == 200 and same["min_cosine"] > 1 - 1e-5 and same["mse"] < 1e-10
    moved_contexts = rollout + 0.5 * torch.randn_like(rollout)
    moved = context_agreement(model, Phase2Data(moved_contexts, ids), rollout[:200], torch.device("cpu"))
    # F(P_{i−1}, x_i) one position at a time (zeros before the stream), then cosine and MSE in numpy.
    with torch.no_grad():
        model.eval()
        tokens = model.token_inputs(ids)
        fast = np.stack([model.context_block(moved_contexts[i - 1:i] if i else torch.zeros(1, 16),
                                             tokens[i:i + 1])[-1][0].numpy() for i in range(200)]).astype(np.float64)
    slow = rollout[:200].numpy().astype(np.float64)
    cosine = (fast * slow).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(slow, axis=1)
    assert moved["tokens"] == 200
    assert moved["mean_cosine"] == pytest.approx(cosine.mean(), abs=1e-5)
    assert moved["min_cosine"] == pytest.approx(cosine.min(), abs=1e-5)
    assert moved["mse"] == pytest.approx(((fast - slow) ** 2).mean(), rel=1e-4)
    assert moved["min_cosine"] < moved["mean_cosine"] - 0.01  # the two statistics are not the same number


def test_the_fast_path_trains_on_phase_1s_contexts_and_says_so(tmp_path: Path) -> None:
    result = run(tmp_path, FAST)
    record = result["results"][0]
    assert record["train_contexts"] == "phase1" and record["solve"]["method"] == "phase1"
    agreement = record["context_agreement"]
    assert agreement["tokens"] == record["train_tokens"] - 1
    assert any("no rollout over the training stream" in note for note in record["notes"])
    faithful = run(tmp_path / "faithful", ["experiment.samples=[24]", ONE_MODEL])["results"][0]
    assert faithful["train_contexts"] == "rollout" and faithful["solve"]["method"] != "phase1"
    assert faithful["context_agreement"] == agreement  # the same Phase 1, so the same contexts compared
    # Phase 1 is the same in both; Phase 2 trains on other contexts, so its numbers move.
    assert faithful["train_er"] == record["train_er"] and faithful["val_ppl"] != record["val_ppl"]


@pytest.mark.slow
def test_the_fast_path_resumes_from_phase_1s_saved_contexts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = run(tmp_path / "whole", FAST)["results"]
    # Kill after Phase 1's checkpoint: the next start must read P back from the run directory.
    import newllm_kit_plugins.cvfp.recipe as experiment

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_phase2", killed)
    with pytest.raises(RunInterrupted):
        run(tmp_path / "cut", FAST)
    monkeypatch.undo()
    saved = list((tmp_path / "cut" / "runs").glob("tiny/*/checkpoints/*/phase1-contexts.safetensors"))
    assert len(saved) == 1
    run_dir = saved[0].parents[2]
    resumed = run(tmp_path / "cut", FAST, resume=True)["results"]
    assert json.dumps(without_timings(whole), sort_keys=True) == json.dumps(without_timings(resumed), sort_keys=True)
    assert not (run_dir / "checkpoints").exists()  # removed with the finished unit's checkpoint


def test_a_damaged_saved_context_file_restarts_the_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import newllm_kit_plugins.cvfp.recipe as experiment

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_phase2", killed)
    with pytest.raises(RunInterrupted):
        run(tmp_path, FAST)
    monkeypatch.undo()
    (saved,) = (tmp_path / "runs").glob("tiny/*/checkpoints/*/phase1-contexts.safetensors")
    saved.write_bytes(saved.read_bytes()[:100])
    resumed = run(tmp_path, FAST, resume=True)["results"]
    whole = run(tmp_path / "whole", FAST)["results"]  # the unit started over: the uninterrupted numbers
    assert json.dumps(without_timings(resumed), sort_keys=True) == json.dumps(without_timings(whole), sort_keys=True)


def test_v2_fast_is_v2_with_the_references_two_later_changes() -> None:
    from newllm_kit.config import load_config

    registry = load_plugins().registry
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    v2 = load_config(experiments / "v2.toml", registry).resolved()
    fast = load_config(experiments / "v2-fast.toml", registry).resolved()
    assert fast["solver"].pop("init") == "random" and v2["solver"].pop("init") == "rollout"
    assert fast["phase2"].pop("train_contexts") == "phase1" and v2["phase2"].pop("train_contexts") == "rollout"
    assert fast["experiment"].pop("name") == "v2-fast" and v2["experiment"].pop("name") == "v2"
    assert fast == v2
