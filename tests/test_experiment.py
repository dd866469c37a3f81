"""`newllm-kit run` end to end on tiny local data: run directory, determinism, kill and resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import ROOT, cli

from newllm_kit.errors import DataError, UserError
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute

TINY = """
[experiment]
name = "tiny"
samples = [12, 24]
seed = 7

[data]
source = "synthetic"
words_per_doc = 20
docs = 400
val = { start = 300, count = 12 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[solver]
name = "cvfp"
min_iterations = 2
max_iterations = 4
batch_size = 512
val_convergence_trials = 3  # the seed's 10 cost seconds per unit; test_diagnostics checks them

[phase2]
epochs = 3
patience = 1
batch_size = 128
learning_rate = 0.01

[runner]
name = "cpu"

[[models]]
label = "A"
variant = "gradual-reduction"
layers = 2
context_dim = 16
embedding_dim = 16

[[models]]
label = "B"
variant = "token-every-layer"
layers = 1
context_dim = 24
embedding_dim = 16
"""

TIMING_KEYS = {"seconds"}


def write_tiny(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("run")
    result = execute(write_tiny(tmp), [], tmp / "runs", False, "none", load_plugins())
    return {**result, "tmp": tmp}


@pytest.mark.slow
def test_run_directory_has_every_artifact(finished: dict[str, Any]) -> None:
    run_dir = Path(finished["run_dir"])
    assert run_dir.parent.name == "tiny"
    for name in ("config.resolved.toml", "overrides.txt", "meta.json", "results.jsonl", "results.csv",
                 "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished"
    assert set(meta["fingerprints"]) >= {"corpus", "tokenizer", "split"}
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_results_records_hold_what_the_table_needs(finished: dict[str, Any]) -> None:
    """Token counts, the synthetic source's PPL bound and the stream hashes, each against the rows' bytes
    rebuilt here: a prefix of the wrong length, the validation stream's count or hash in a training field
    (meta.json pins the training stream of the largest size) or a bound over the wrong number of
    documents fails. The metrics are checked against the run's own lines below and, through
    `evaluate`, in test_kept_models."""
    from fixtures import ids_sha256, synthetic_ids
    from newllm_kit_plugins.data.synthetic import Synthetic, SyntheticSettings

    records = read_results(Path(finished["run_dir"]))
    assert [(r["model"], r["samples"]) for r in records] == [("A", 12), ("A", 24), ("B", 12), ("B", 24)]
    val = synthetic_ids(range(300, 312))
    document_entropy = Synthetic(SyntheticSettings(docs=400, words_per_doc=20)).document_entropy_nats()
    for r in records:
        for key in ("train_tokens", "val_tokens", "val_ppl", "val_acc", "train_er", "val_er",
                    "phase1_iterations", "convergence_rate", "best_epoch", "params", "seconds", "fingerprints"):
            assert key in r, key
        assert r["train_tokens"] == synthetic_ids(range(r["samples"])).size
        assert r["val_tokens"] == val.size
        assert math.isclose(r["best_possible_ppl"], math.exp(12 * document_entropy / val.size), rel_tol=1e-12)
        # the record says whether Phase 1 reached its target or ran out of iterations
        assert r["phase1_target_rate"] == 0.95
        expected = "converged" if r["convergence_rate"] >= 0.95 else "max_iterations"
        assert r["phase1_stopped_by"] == expected
        if expected == "max_iterations":
            assert r["phase1_iterations"] == 4
    pinned = json.loads((Path(finished["run_dir"]) / "meta.json").read_text())["fingerprints"]
    assert (pinned["train_ids"], pinned["val_ids"]) == (ids_sha256(synthetic_ids(range(24))), ids_sha256(val))


def test_each_record_agrees_with_the_metrics_lines_and_document_sums_it_came_from(
        finished: dict[str, Any]) -> None:
    """What a record says against what the run logged: Phase 1's passes and last rate, the best Phase-2
    epoch (lowest validation loss: its PPL and accuracy are the record's), and the validation totals
    of the per-document sums. A pass counted twice (`phase1_iterations` + 1 passed the range check
    this replaces), another epoch's numbers or a document dropped from the sums fails here."""
    run_dir = Path(finished["run_dir"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in read_results(run_dir):
        unit = f"{r['model']}-{r['samples']}"
        phase1 = [row for row in lines if row["unit"] == unit and row["phase"] == "phase1"]
        assert [row["iteration"] for row in phase1] == list(range(r["phase1_iterations"]))
        assert r["convergence_rate"] == phase1[-1]["rate"]
        epochs = [row for row in lines if row["unit"] == unit and row["phase"] == "phase2"]
        best = min(epochs, key=lambda row: row["val_loss"])
        assert r["best_epoch"] == best["epoch"]
        assert (r["val_ppl"], r["val_acc"]) == (best["val_ppl"], best["val_acc"])
        sums = json.loads((run_dir / r["val_documents"]).read_text())
        tokens = sum(sums["tokens"])
        assert tokens == r["val_tokens"] - 1
        assert math.isclose(r["val_ppl"], math.exp(sum(sums["nll"]) / tokens), rel_tol=1e-9)
        assert r["val_acc"] == sum(sums["hits"]) / tokens


def test_summary_has_a_scaling_fit_per_model(finished: dict[str, Any]) -> None:
    fits = {f["model"]: f for f in finished["scaling"]["fits"]}
    assert set(fits) == {"A", "B"} and fits["A"]["points"] == 2


@pytest.mark.slow
def test_same_seed_same_results(finished: dict[str, Any], tmp_path: Path) -> None:
    again = execute(write_tiny(tmp_path), [], tmp_path / "runs", False, "none", load_plugins())
    assert without_timings(read_results(Path(again["run_dir"]))) == without_timings(
        read_results(Path(finished["run_dir"])))


def test_resume_of_a_finished_run_recomputes_nothing(finished: dict[str, Any]) -> None:
    run_dir = Path(finished["run_dir"])
    before = (run_dir / "metrics.jsonl").read_text()
    result = execute(run_dir, [], run_dir.parent.parent, True, "none", load_plugins())
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert without_timings(result["results"]) == without_timings(read_results(run_dir))


def test_resume_with_a_different_config_is_refused(finished: dict[str, Any]) -> None:
    tmp = finished["tmp"]
    with pytest.raises(UserError, match=r"differs .* phase2\.epochs"):
        execute(write_tiny(tmp), ["phase2.epochs=5"], tmp / "runs", True, "none", load_plugins())


def test_more_samples_than_the_corpus_has(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="400"):
        execute(write_tiny(tmp_path), ["experiment.samples=[500]", "data.val.start=600"], tmp_path / "runs",
                False, "none", load_plugins())


def _unfinished_unit_checkpointed(run_dir: Path) -> bool:
    """A unit is in results.jsonl and another, unfinished one has published a checkpoint. (A finished
    unit's checkpoint lives on for a moment after its record is written, so LATEST alone is not enough.)"""
    try:
        lines = (run_dir / "results.jsonl").read_text().splitlines()
        finished = {f"{r['model']}-{r['samples']}" for r in map(json.loads, lines)}
    except (OSError, ValueError, KeyError):
        return False
    return bool(finished) and any(p.parent.name not in finished for p in (run_dir / "checkpoints").glob("*/LATEST"))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_results(finished: dict[str, Any], tmp_path: Path) -> None:
    path = write_tiny(tmp_path)
    out = tmp_path / "runs"
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, "-m", "newllm_kit", "run", str(path), "--out", str(out),
                                "--progress", "plain"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed_mid_unit = False
    while time.monotonic() < deadline and process.poll() is None:
        runs = [p for p in out.glob("tiny/*") if (p / "config.resolved.toml").exists()]
        if runs and _unfinished_unit_checkpointed(runs[0]):
            os.kill(process.pid, signal.SIGKILL)  # one unit finished, the next one checkpointed
            killed_mid_unit = True
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    run_dir = next(p for p in out.glob("tiny/*") if (p / "config.resolved.toml").exists())
    assert killed_mid_unit, "the run finished before it could be killed"
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "running"
    resumed = cli("run", str(path), "--out", str(out), "--resume", "--progress", "plain")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint" in resumed.stderr
    assert without_timings(read_results(run_dir)) == without_timings(read_results(Path(finished["run_dir"])))


@pytest.mark.slow
def test_run_cli_prints_the_table_and_fit(tmp_path: Path) -> None:
    result = cli("run", str(write_tiny(tmp_path)), "--out", str(tmp_path / "runs"), "--progress", "plain",
                 "--set", "experiment.samples=[12, 24]", "--set", "models.1.layers=2")
    assert result.returncode == 0, result.stderr
    assert "Val PPL" in result.stdout and "PPL = " in result.stdout and "tokens^" in result.stdout
    assert "A-12" in result.stderr  # plain progress lines go to stderr
    json_run = cli("run", str(write_tiny(tmp_path)), "--out", str(tmp_path / "runs"), "--json")
    assert json_run.returncode == 0
    assert json.loads(json_run.stdout)["results"][0]["model"] == "A"


@pytest.mark.slow
def test_v2_file_runs_its_real_code_path_offline_on_local_copies(tmp_path: Path) -> None:
    """ultrachat parquet + GPT-2 tokenizer dir + GPT-2 model dir: the loaders the hub path uses."""
    from fixtures import (
        FIXTURE_GPT2_VOCAB,
        make_gpt2_model_dir,
        make_gpt2_tokenizer_dir,
        make_ultrachat_parquet,
        ultrachat_rows,
    )
    from transformers import AutoTokenizer

    data = make_ultrachat_parquet(tmp_path / "ultrachat", 70)
    tokenizer = make_gpt2_tokenizer_dir(tmp_path / "tokenizer")
    model = make_gpt2_model_dir(tmp_path / "gpt2", FIXTURE_GPT2_VOCAB, 32)
    overrides = [f"data.path={data}", f"tokenizer.path={tokenizer}", f"embedding.path={model}",
                 f"tokenizer.expect_vocab={FIXTURE_GPT2_VOCAB}", "experiment.samples=[20, 40]",
                 "data.val.start=50", "data.val.count=10", "solver.min_iterations=2", "solver.max_iterations=3",
                 "phase2.epochs=2", "runner.name=cpu"]
    for i, (layers, width) in enumerate([(2, 32), (1, 64)]):
        overrides += [f"models.{i}.layers={layers}", f"models.{i}.context_dim={width}",
                      f"models.{i}.embedding_dim=32"]
    result = execute(ROOT / "experiments" / "v2.toml", overrides, tmp_path / "runs", False, "none",
                     load_plugins())
    records = result["results"]
    assert [(r["model"], r["samples"]) for r in records] == [("A", 20), ("A", 40), ("B", 20), ("B", 40)]
    # the streams are the rows' first turns, each encoded on its own by transformers' own loader of the folder
    encode = AutoTokenizer.from_pretrained(tokenizer)
    lengths = [len(encode(row["messages"][0]["content"])["input_ids"]) for row in ultrachat_rows(70)]
    assert [(r["train_tokens"], r["val_tokens"]) for r in records] == [
        (sum(lengths[:n]), sum(lengths[50:60])) for n in (20, 40)] * 2
    assert records[0]["params"]["embedding"] == FIXTURE_GPT2_VOCAB * 32 + 2 * 32
    meta = json.loads((Path(result["run_dir"]) / "meta.json").read_text())
    assert meta["fingerprints"]["scheme"] == "first_turn"
    resolved = (Path(result["run_dir"]) / "config.resolved.toml").read_text()
    assert f'name_or_path = "{tokenizer}"' in resolved


def test_non_contracting_solves_are_reported_once_per_unit_with_what_they_mean() -> None:
    from newllm_kit_plugins.cvfp.contract import SolveResult
    from newllm_kit_plugins.cvfp.recipe import _solve_notes

    def solved(gain: float | None) -> SolveResult:
        return SolveResult([], "sequential", 1, 1, 0.0, gain=gain)

    messages = ["the ContextBlock does not contract (measured gain 1.03 >= 1): no parallel solve converges",
                "the ContextBlock does not contract (measured gain 1.04 >= 1): no parallel solve converges",
                "neighbouring chunks did not agree: using the sequential rollout"]
    notes = _solve_notes(messages, {"train": solved(1.03), "val": solved(1.04)})
    assert len(notes) == 2
    assert "1.03 on train, 1.04 on val" in notes[0] and "exact, only slower" in notes[0]
    assert notes[1].startswith("neighbouring chunks")
    assert _solve_notes([], {"train": solved(0.5), "val": solved(None)}) == []


def test_a_disk_store_gives_the_same_results_and_leaves_no_file(finished: dict[str, Any], tmp_path: Path) -> None:
    result = execute(write_tiny(tmp_path), ["experiment.samples=[12]", 'runner.context_store="disk"'],
                     tmp_path / "runs", False, "none", load_plugins())
    run_dir = Path(result["run_dir"])
    on_device = [r for r in read_results(Path(finished["run_dir"])) if r["samples"] == 12]
    on_disk = read_results(run_dir)
    for disk, device in zip(on_disk, on_device, strict=True):
        assert disk.pop("context_store") == {**device.pop("context_store"), "kind": "disk"}
    assert without_timings(on_disk) == without_timings(on_device)
    assert not (run_dir / "store").exists()
    stores = json.loads((run_dir / "meta.json").read_text())["context_stores"]
    assert {unit: store["kind"] for unit, store in stores.items()} == {"A-12": "disk", "B-12": "disk"}


def test_a_bf16_store_halves_the_bytes_and_stays_close(finished: dict[str, Any], tmp_path: Path) -> None:
    result = execute(write_tiny(tmp_path), ["experiment.samples=[12]", 'runner.context_dtype="bf16"',
                                            "models=[{label = \"A\", layers = 2, context_dim = 16, "
                                            "embedding_dim = 16}]"],
                     tmp_path / "runs", False, "none", load_plugins())
    (half,) = result["results"]
    (full,) = [r for r in read_results(Path(finished["run_dir"])) if (r["model"], r["samples"]) == ("A", 12)]
    assert half["context_store"] == {**full["context_store"], "dtype": "bf16",
                                     "bytes": full["context_store"]["bytes"] // 2}
    assert half["val_ppl"] == pytest.approx(full["val_ppl"], rel=0.02)
    assert half["train_er"] == full["train_er"]  # Phase 1 stays fp32


def test_out_of_memory_in_phase_2_is_one_line_naming_the_store_and_settings(tmp_path: Path) -> None:
    from newllm_kit_plugins.cvfp import recipe as cvfp_recipe

    from newllm_kit.errors import RunFailed

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        refusal = UserError("out of memory on cpu at batch 128: lower the batch size to 64, or runner.auto_batch "
                            "= true to halve the micro-batch automatically (same effective batch)")
        raise refusal from torch.OutOfMemoryError("CUDA out of memory")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(RunFailed) as failed:
        patch.setattr(cvfp_recipe, "train_phase2", no_memory)
        execute(write_tiny(tmp_path), ["experiment.samples=[12]"], tmp_path / "runs", False, "none", load_plugins())
    assert failed.value.exit_code == 1
    assert re.fullmatch(r"A-12: phase 2: out of memory on cpu at batch 128: lower the batch size to 64, or "
                        r"runner.auto_batch = true to halve the micro-batch automatically \(same effective batch\); "
                        r"the context stores take [\d,]+ bytes \([\d.]+ KiB, device, fp32\); set "
                        r'phase2.batch_size lower, or runner.context_store = "host" or "disk" or '
                        r'runner.context_dtype = "bf16"', str(failed.value))
