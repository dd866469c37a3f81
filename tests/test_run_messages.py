"""What `run` and `validate` say before and around a run: every problem found without data in one message,
no run folder and no "finished" for a run that never started, and progress through the seed's diagnostics
and the meaning of Phase 1's first rate."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from newllm_kit_plugins.cvfp.diagnostics import CONVERGENCE_PHASE, convergence_check
from newllm_kit_plugins.cvfp.phase1 import ROLLOUT_RATE_NOTE
from test_diagnostics import ONE_MODEL, tiny_model
from test_experiment import TINY, read_results, write_tiny
from test_recipe_outputs import main

from newllm_kit.plots import unit_figure
from newllm_kit.plugins import load_plugins
from newllm_kit.progress import PlainProgress
from newllm_kit.run import execute

ROOT = Path(__file__).parent.parent

LOCAL = """
[experiment]
name = "local"
samples = [20]

[data]
source = "ultrachat"
path = "PATH/no-data"
val = { start = 100, count = 10 }

[tokenizer]
name = "gpt2"
name_or_path = "PATH/no-tokenizer"

[embedding]
source = "gpt2"
name_or_path = "PATH/no-embedding"

[runner]
name = "cpu"

[[models]]
label = "A"
architecture = "cvfp"
layers = 1
context_dim = 8
embedding_dim = 8
"""

SMALL = """
[experiment]
name = "small"
samples = [300]

[data]
source = "synthetic"
docs = 400
val = { start = 1000, count = 100 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[runner]
name = "cpu"

[[models]]
label = "A"
architecture = "cvfp"
layers = 1
context_dim = 8
embedding_dim = 8
"""


def local_paths(tmp_path: Path) -> Path:
    path = tmp_path / "local.toml"
    path.write_text(LOCAL.replace("PATH", str(tmp_path)))
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub and an empty hub cache, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))


def test_run_names_every_missing_local_component_at_once_and_leaves_no_run_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["run", str(local_paths(tmp_path)), "--out", str(out), "--progress", "plain"], load_plugins(),
                monkeypatch)
    line = one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"error: {tmp_path / 'local.toml'}: 3 problems")
    for key in ("data.path", "tokenizer.name_or_path", "embedding.name_or_path"):
        assert key in line
    assert not out.exists()


@pytest.mark.usefixtures("offline")
def test_run_of_v2_offline_names_data_tokenizer_and_embedding_in_one_try(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["run", str(ROOT / "experiments" / "v2.toml"), "--out", str(out), "--progress", "plain"],
                load_plugins(), monkeypatch)
    err = capsys.readouterr().err
    line = one_line(err)
    assert code == 2 and "finished" not in err
    assert "data source 'ultrachat'" in line and "tokenizer 'gpt2'" in line and "embedding 'gpt2'" in line
    assert not out.exists()


def test_a_run_stopped_by_a_user_error_before_any_unit_leaves_no_folder_and_no_finished_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    path = write_tiny(tmp_path, SMALL)  # validation rows 1000…1099 of a 400-row corpus: found when it is read
    code = main(["run", str(path), "--out", str(out), "--progress", "plain"], load_plugins(), monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "the corpus has 400 rows" in err.splitlines()[-1]
    assert "finished" not in err and "stopped after" in err
    assert not (out / "small").exists() or not any((out / "small").iterdir())


def test_validate_refuses_training_rows_that_overlap_validation_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tiny(tmp_path, SMALL)
    code = main(["validate", str(path), "--set", "experiment.samples=[300, 5000]"], load_plugins(), monkeypatch)
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert "training rows 0…4999 overlap validation rows 1000…1099" in line


def test_validate_refuses_components_that_cannot_load_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(local_paths(tmp_path))], load_plugins(), monkeypatch)
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "3 problems" in line
    assert str(tmp_path / "no-data") in line and str(tmp_path / "no-tokenizer") in line
    assert str(tmp_path / "no-embedding") in line


def test_validate_still_accepts_a_runnable_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(write_tiny(tmp_path, SMALL)), "--set", "data.val.start=300"], load_plugins(),
                monkeypatch)
    assert code == 0 and "ok" in capsys.readouterr().out


def test_plain_progress_says_finished_only_after_the_experiment_ran() -> None:
    before = io.StringIO()
    PlainProgress(before).close()
    assert "before any unit started" in before.getvalue() and "finished" not in before.getvalue()
    ran = io.StringIO()
    progress = PlainProgress(ran)
    progress.experiment("x", 1)
    progress.end_unit("A-1", "")
    progress.close()
    assert "finished in" in ran.getvalue().splitlines()[-1]


class Recorded:
    """A Progress that keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def start(self, phase: str, total: int | None) -> None:
        self.events.append(("start", phase, total))

    def advance(self, phase: str, **fields: float) -> None:
        self.events.append(("advance", phase, fields.get("trial")))

    def finish(self, phase: str) -> None:
        self.events.append(("finish", phase))

    def message(self, text: str) -> None:
        self.events.append(("message", text))


def test_each_validation_trial_advances_its_own_progress_phase() -> None:
    progress = Recorded()
    convergence_check(tiny_model(), torch.randint(0, 40, (30,)), 3, progress)
    assert progress.events == [("start", CONVERGENCE_PHASE, 3), *(("advance", CONVERGENCE_PHASE, t) for t in (1, 2, 3)),
                               ("finish", CONVERGENCE_PHASE)]


@pytest.mark.slow
def test_a_cvfp_run_says_what_its_diagnostics_run_and_what_phase1s_first_rate_measures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = execute(write_tiny(tmp_path, TINY), ONE_MODEL, tmp_path / "runs", False, "plain", load_plugins())
    err = capsys.readouterr().err
    run_dir = Path(result["run_dir"])
    assert "A-12: diagnostics of the frozen block: identity check, 3 sequential rollouts over the" in err
    assert f"A-12 {CONVERGENCE_PHASE}: start (up to 3)" in err and f"A-12 {CONVERGENCE_PHASE}: done" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows if r["phase"] == CONVERGENCE_PHASE] == [1, 2, 3]
    assert f"] phase1: {ROLLOUT_RATE_NOTE}" in err
    [record] = read_results(run_dir)
    assert record["phase1_rate_note"] == ROLLOUT_RATE_NOTE
    curves = {"phase1": [r for r in rows if r["phase"] == "phase1"]}
    caption = unit_figure(record, "A-12", curves).get_supxlabel()
    assert caption.replace("\n", " ").startswith("phase1: rate = share of tokens within convergence_threshold")
