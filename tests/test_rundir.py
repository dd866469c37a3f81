"""Trustworthy run directories: checkpoints are data, paths stay inside, one writer, repair on resume,
damaged files give one line or a restart, interrupted runs say so, ranks follow rank 0."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from newllm_kit_plugins.cvfp import recipe as cvfp_recipe
from newllm_kit_plugins.cvfp.checkpoint_fit import check_checkpoint, shapes
from newllm_kit_plugins.cvfp.phase2 import Phase2Settings, phase2_optimizer
from safetensors.torch import save_file
from test_cli import ROOT
from test_experiment import read_results, without_timings, write_tiny

from newllm_kit import experiment, rundir
from newllm_kit.errors import RunInterrupted, UserError
from newllm_kit.plugins import load_plugins
from newllm_kit.progress import NullProgress
from newllm_kit.protocols import EvalOutputs
from newllm_kit.run import execute
from newllm_kit.rundir import CheckpointUnreadable, RunDir
from newllm_kit.training import TrainState as Phase2State
from newllm_kit.unit_checkpoint import UnitCheckpoint

SMALL = ["experiment.samples=[12]"]  # units A-12 and B-12


def run_dir_of(tmp: Path) -> RunDir:
    run = RunDir(tmp / "run")
    (run.path / "config.resolved.toml").parent.mkdir(parents=True)
    (run.path / "config.resolved.toml").write_text("")
    return run


def weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float64)}


# -- checkpoints are data -------------------------------------------------------------------------

def test_a_checkpoint_is_safetensors_and_json(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path)
    run.save_checkpoint("A-12", "phase2", {"model": weights(), "phase2": {"rng": torch.get_rng_state()}},
                        {"phase1": {"iterations": 3}, "phase2": {"best_val_loss": float("inf")}})
    folder = next(p for p in run.checkpoint_dir("A-12").iterdir() if p.is_dir())
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "phase2.safetensors", "state.json"]
    stage, groups, state = run.load_checkpoint("A-12") or ("", {}, {})
    assert stage == "phase2" and state == {"phase1": {"iterations": 3}, "phase2": {"best_val_loss": float("inf")}}
    assert all(torch.equal(groups["model"][k], v) for k, v in weights().items())
    assert torch.equal(groups["phase2"]["rng"], torch.get_rng_state())


class _Payload:
    """A pickle that creates a file when loaded: what a planted state.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def plant_old_checkpoint(unit_dir: Path, marker: Path) -> None:
    folder = unit_dir / "phase1-abcdef"
    folder.mkdir(parents=True)
    save_file(weights(), str(folder / "model.safetensors"))
    (folder / "state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (unit_dir / "LATEST").write_text(folder.name)


def test_an_old_pickle_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload works

    run, marker = run_dir_of(tmp_path), tmp_path / "pwned"
    plant_old_checkpoint(run.checkpoint_dir("A-12"), marker)
    with pytest.raises(UserError, match=r"older newllm-kit \(pickle state\.pt.*delete .*A-12 to restart"):
        run.load_checkpoint("A-12")
    assert not marker.exists()


def test_checkpoint_tensors_load_onto_the_given_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, asked = run_dir_of(tmp_path), []
    run.save_checkpoint("A-12", "phase1", {"model": weights()}, {"phase1": {}})
    monkeypatch.setattr(rundir, "load_file", lambda file, device: asked.append(device) or {})
    run.load_checkpoint("A-12", torch.device("cuda", 1))  # each rank its own device, never the writer's
    assert asked == ["cuda:1"]


# -- paths stay inside ------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", ["../../x", "..", "a/b", "a\\b", "/abs", "", "x\0y"])
def test_unit_ids_that_are_not_plain_names_are_refused(tmp_path: Path, unit: str) -> None:
    run = run_dir_of(tmp_path)
    for act in (lambda: run.save_checkpoint(unit, "phase1", {"model": weights()}, {}),
                lambda: run.load_checkpoint(unit), lambda: run.drop_checkpoint(unit)):
        with pytest.raises(UserError, match="not usable as a folder name"):
            act()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_nothing_outside_the_run_directory_is_written_or_deleted(tmp_path: Path) -> None:
    run, outside = run_dir_of(tmp_path), tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "A-12").symlink_to(outside)
    with pytest.raises(UserError, match="outside the run directory"):
        run.drop_checkpoint("A-12")
    with pytest.raises(UserError, match="outside the run directory"):
        run.save_checkpoint("A-12", "phase1", {"model": weights()}, {})
    assert [p.name for p in outside.iterdir()] == ["keep"]
    with pytest.raises(UserError, match="outside the run directory"):
        run.inside(run.path / ".." / "x")
    with pytest.raises(UserError, match="outside the run directory"):
        run.inside(run.path)
    assert run.inside(run.path / "a" / ".." / "b") == (run.path / "b").resolve()


@pytest.mark.parametrize("pointer", ["", "..", "../../etc", "/etc", "a/b", "..\\x", "x\0y", "phase2-000000"])
def test_latest_must_name_a_folder_of_the_unit(tmp_path: Path, pointer: str) -> None:
    run = run_dir_of(tmp_path)
    run.save_checkpoint("A-12", "phase1", {"model": weights()}, {"phase1": {}})
    (run.checkpoint_dir("A-12") / "LATEST").write_text(pointer)
    with pytest.raises(CheckpointUnreadable):
        run.load_checkpoint("A-12")


# -- durable, and with the user's umask ----------------------------------------------------------------

def test_a_checkpoint_is_synced_before_latest_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, synced = run_dir_of(tmp_path), []
    real = rundir._fsync_dir
    unit_dir = run.path / "checkpoints" / "A-12"

    def record(path: Path) -> None:
        synced.append((Path(path).name, (unit_dir / "LATEST").exists()))
        real(path)

    monkeypatch.setattr(rundir, "_fsync_dir", record)
    run.save_checkpoint("A-12", "phase1", {"model": weights()}, {"phase1": {}})
    folder = (unit_dir / "LATEST").read_text()
    assert (f".{folder}.tmp", False) in synced  # the folder's files, before it is published
    assert ("A-12", False) in synced and ("checkpoints", False) in synced  # the rename into place


def test_written_files_get_the_umask_not_0600(tmp_path: Path) -> None:
    code = ("import os, sys; os.umask(0o027); from pathlib import Path; from newllm_kit.rundir import "
            "atomic_write_text; atomic_write_text(Path(sys.argv[1]), 'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], check=True, cwd=ROOT)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


# -- one writer ---------------------------------------------------------------------------------------

def write_lock(run: RunDir, pid: int, host: str | None = None) -> None:
    lock = {"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-01T00:00:00"}
    (run.path / ".lock").write_text(json.dumps(lock))


def test_a_second_writer_is_refused_with_who_holds_the_lock(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path)
    run.lock(print)
    with pytest.raises(UserError, match=rf"in use by another newllm-kit process \(pid {os.getpid()} on "
                                        rf"{socket.gethostname()}, since "):
        RunDir(run.path).lock(print)
    run.unlock()
    assert not (run.path / ".lock").exists()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path)
    write_lock(run, 4242, "elsewhere")
    with pytest.raises(UserError, match=r"pid 4242 on host elsewhere .* if that process is gone, delete .*\.lock"):
        run.lock(print)
    (run.path / ".lock").write_text("")
    with pytest.raises(UserError, match=r"unreadable.*delete"):
        run.lock(print)


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    run, notes = run_dir_of(tmp_path), []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(run, dead.pid)
    run.lock(notes.append)
    assert notes == [f"{run.path}: taking over the lock of pid {dead.pid} (since 2025-01-01T00:00:00), "
                     f"which is no longer running"]
    assert json.loads((run.path / ".lock").read_text())["pid"] == os.getpid()
    write_lock(run, 4242, "elsewhere")  # someone took it meanwhile: unlock leaves it alone
    run.unlock()
    assert (run.path / ".lock").exists()


# -- results and repair ---------------------------------------------------------------------------------

A_12 = {"model": "A", "samples": 12, "train_tokens": 300, "val_tokens": 90, "val_ppl": 12.5, "val_acc": 0.25}


def finished_records(run: RunDir, warn: Any) -> list[dict[str, Any]]:
    return run.finished_records(lambda r: (r["model"], r["samples"]), {("A", 12)}, warn)[0]


def test_a_cut_last_results_line_is_skipped_and_a_bad_one_elsewhere_named(tmp_path: Path) -> None:
    run, notes = run_dir_of(tmp_path), list[str]()
    good = json.dumps(A_12)
    (run.path / "results.jsonl").write_text(f'{good}\n{{"model": "B", "sam')
    assert finished_records(run, notes.append) == [A_12]
    assert notes == [f"warning: {run.path / 'results.jsonl'}:2: skipping a cut-off last line (left by a killed run)"]
    (run.path / "results.jsonl").write_text(f"garbage\n{good}\n")
    with pytest.raises(UserError, match=r"results\.jsonl:1: not a result record"):
        finished_records(run, notes.append)


# -- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugins() -> Any:
    return load_plugins()


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, plugins: Any) -> Path:
    tmp = tmp_path_factory.mktemp("whole")
    return Path(execute(write_tiny(tmp), SMALL, tmp / "runs", False, "none", plugins)["run_dir"])


@pytest.fixture(scope="module")
def uninterrupted(whole: Path) -> list[dict[str, Any]]:
    return read_results(whole)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, plugins: Any) -> Path:
    """A run stopped by Ctrl-C after B-12's first Phase-2 epoch: A-12 finished, B-12 checkpointed."""
    tmp = tmp_path_factory.mktemp("interrupted")
    real, calls = cvfp_recipe.train_phase2, []

    def train(*args: Any, on_epoch_end: Any, **kwargs: Any) -> Any:
        calls.append(1)

        def then_stop(state: Phase2State) -> None:
            on_epoch_end(state)
            if len(calls) == 2:
                raise KeyboardInterrupt

        return real(*args, on_epoch_end=then_stop, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(RunInterrupted) as stopped:
        patch.setattr(cvfp_recipe, "train_phase2", train)
        execute(write_tiny(tmp), SMALL, tmp / "runs", False, "none", plugins)
    return Path(stopped.value.run_dir)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "tiny" / run_dir.name, symlinks=True))


@pytest.mark.slow
def test_an_interrupted_run_says_so_and_resumes_to_the_same_results(
        interrupted: Path, uninterrupted: list[dict[str, Any]], tmp_path: Path, plugins: Any) -> None:
    meta = json.loads((interrupted / "meta.json").read_text())
    assert (meta["status"], meta["signal"], meta["attempt"]) == ("interrupted", "SIGINT", 1)
    assert not (interrupted / ".lock").exists()
    assert (interrupted / "checkpoints" / "B-12" / "LATEST").read_text().startswith("phase2-")

    run_dir = copy_of(interrupted, tmp_path)
    result = execute(run_dir, [], tmp_path, False, "none", plugins)
    assert without_timings(result["results"]) == without_timings(uninterrupted)
    assert json.loads((run_dir / "meta.json").read_text())["attempt"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["unit"], r["attempt"]) for r in rows} == {("A-12", 1), ("B-12", 1), ("B-12", 2)}
    assert not (run_dir / "checkpoints").exists()


def test_resume_repairs_a_finished_unit_cut_short_without_recomputing(
        whole: Path, interrupted: Path, tmp_path: Path, plugins: Any) -> None:
    """Killed between results.jsonl and results.csv of the last unit: no csv or summary, a temporary,
    the finished unit's checkpoint and a cut metrics line are left."""
    run_dir = copy_of(whole, tmp_path)
    csv_before, summary_before = (run_dir / "results.csv").read_text(), (run_dir / "summary.json").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for name in ("results.csv", "summary.json"):
        (run_dir / name).unlink()
    (run_dir / ".results.csv.x1y2.tmp").write_text("half")
    shutil.copytree(interrupted / "checkpoints" / "B-12", run_dir / "checkpoints" / "B-12")
    (run_dir / "checkpoints" / "B-12" / ".phase2-abcdef.tmp").mkdir()
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"unit": "B-12", "pha')  # an append cut by the kill

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "run_unit", lambda *a, **k: pytest.fail("a unit was recomputed"))
        execute(run_dir, [], tmp_path, False, "none", plugins)
    assert (run_dir / "results.csv").read_text() == csv_before
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(summary_before)
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "checkpoints").exists()
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


def _empty_latest(cp: Path, folder: Path) -> None:
    (cp / "LATEST").write_text("")


def _missing_folder(cp: Path, folder: Path) -> None:
    shutil.rmtree(folder)


def _empty_weights(cp: Path, folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _garbage_weights(cp: Path, folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x07garbage" * 100)


def _truncated_state_tensors(cp: Path, folder: Path) -> None:
    data = (folder / "phase2.safetensors").read_bytes()
    (folder / "phase2.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_state(cp: Path, folder: Path) -> None:
    (folder / "state.json").write_text('{"phase1": ')


def _missing_state(cp: Path, folder: Path) -> None:
    (folder / "state.json").unlink()


def _foreign_weights(cp: Path, folder: Path) -> None:
    save_file(weights(), str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage", [_empty_latest, _missing_folder, _empty_weights, _garbage_weights,
                                    _truncated_state_tensors, _garbage_state, _missing_state, _foreign_weights])
def test_a_damaged_checkpoint_restarts_its_unit_with_a_warning(
        damage: Any, interrupted: Path, uninterrupted: list[dict[str, Any]], tmp_path: Path, plugins: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    cp = run_dir / "checkpoints" / "B-12"
    damage(cp, cp / (cp / "LATEST").read_text())
    result = execute(run_dir, [], tmp_path, False, "plain", plugins)
    assert f"warning: B-12: the checkpoint in {cp.resolve()} is unreadable" in capsys.readouterr().err
    assert without_timings(result["results"]) == without_timings(uninterrupted)
    assert not (run_dir / "checkpoints").exists()


def test_an_old_pickle_checkpoint_stops_the_resume_with_one_line(interrupted: Path, tmp_path: Path,
                                                                 plugins: Any) -> None:
    run_dir, marker = copy_of(interrupted, tmp_path), tmp_path / "pwned"
    shutil.rmtree(run_dir / "checkpoints" / "B-12")
    plant_old_checkpoint(run_dir / "checkpoints" / "B-12", marker)
    with pytest.raises(UserError, match="older newllm-kit"):
        execute(run_dir, [], tmp_path, False, "none", plugins)
    assert not marker.exists()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed" and "older newllm-kit" in meta["error"]
    assert not (run_dir / ".lock").exists()


def test_a_run_in_use_is_refused_before_anything_is_written(interrupted: Path, tmp_path: Path,
                                                            plugins: Any) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    write_lock(RunDir(run_dir), os.getppid())
    meta = (run_dir / "meta.json").read_text()
    with pytest.raises(UserError, match=rf"in use by another newllm-kit process \(pid {os.getppid()} "):
        execute(run_dir, [], tmp_path, False, "none", plugins)
    assert (run_dir / "meta.json").read_text() == meta


def test_a_failure_is_recorded_with_a_non_empty_error(interrupted: Path, tmp_path: Path, plugins: Any) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError):
        patch.setattr(experiment, "run_unit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError()))
        execute(run_dir, [], tmp_path, False, "none", plugins)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["status"], meta["error"]) == ("failed", "RuntimeError")
    assert not (run_dir / ".lock").exists()


def test_a_full_disk_names_the_file_and_how_to_continue(interrupted: Path, tmp_path: Path, plugins: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, real = copy_of(interrupted, tmp_path), rundir.atomic_write_bytes

    def full(path: Path, data: bytes) -> None:
        if path.name == "results.jsonl" and b'"B"' in data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", full)
    with pytest.raises(UserError) as error:
        execute(run_dir, [], tmp_path, False, "none", plugins)
    assert str(error.value) == (f"{(run_dir / 'results.jsonl').resolve()}: cannot write (No space left on device); "
                                f"free space and continue with `newllm-kit run {run_dir}`")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed" and "No space left" in meta["error"]


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path: Path, plugins: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config, out = write_tiny(tmp_path), tmp_path / "out"
    out.write_text("")
    with pytest.raises(UserError, match=r"--out .*out: a file, not a folder"):
        execute(config, SMALL, out, False, "none", plugins)

    def refuse(path: Any, mode: int = 0o777) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(UserError, match=r"--out .*ro: cannot create the run directory .*\(Permission denied\)"):
        execute(config, SMALL, tmp_path / "ro", False, "none", plugins)


def test_a_damaged_resolved_config_is_named_on_resume(interrupted: Path, tmp_path: Path, plugins: Any) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    (run_dir / "config.resolved.toml").write_text("[experiment\n")
    with pytest.raises(UserError, match=r"config\.resolved\.toml: invalid TOML"):
        execute(write_tiny(tmp_path), SMALL, tmp_path, True, "none", plugins)


# -- ranks follow rank 0 ------------------------------------------------------------------------------

class ThreadRank:
    """One of two ranks run as threads: broadcast copies rank 0's tensor through a shared board."""

    device = torch.device("cpu")

    def __init__(self, rank: int, board: dict[str, Any]) -> None:
        self.rank, self.world_size, self.board = rank, 2, board

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        barrier: threading.Barrier = self.board["barrier"]
        if self.rank == src:
            self.board["value"] = tensor.clone()
        barrier.wait()
        tensor.copy_(self.board["value"])
        barrier.wait()
        return tensor


def tiny_model() -> Any:
    from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings

    torch.manual_seed(0)
    model = CVFPArchitecture(CVFPSettings(layers=1, context_dim=8, embedding_dim=4)).build(20)
    model.set_embedding(torch.randn(20, 4), freeze=True)
    return model


def phase2_state(model: Any) -> Phase2State:
    """After one Phase-2 epoch with the default [phase2] settings."""
    params, optimizer = phase2_optimizer(model, Phase2Settings())
    torch.stack([p.sum() for p in params]).sum().backward()
    optimizer.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if any(p is q for q in params)}
    row = {"epoch": 1, "train_loss": 3.0, "train_ppl": 20.1, "val_loss": 2.5, "val_ppl": 12.2, "val_acc": 0.1,
           "seconds": 0.5}
    return Phase2State(epoch=1, best_epoch=1, best_val_loss=2.5, history=[row], model=trained,
                       best_weights={n: t.clone() for n, t in trained.items()},
                       best_val=EvalOutputs(nll_sum=5.0, count=2),
                       optimizer=optimizer.state_dict(), rng=torch.get_rng_state())


@pytest.mark.parametrize("holder", [0, 1])
def test_every_rank_continues_from_rank_0s_checkpoint(tmp_path: Path, holder: int) -> None:
    """Ranks without a shared --out: only `holder`'s folder has the checkpoint; rank 0's view wins."""
    model = tiny_model()
    saved = phase2_state(model)
    tensors, data = saved.to_checkpoint()
    phase1 = {"iterations": 3, "convergence_rate": 1.0, "token_evaluations": 60, "seconds": 1.0, "train_er": 0.5}
    runs = [run_dir_of(tmp_path / str(rank)) for rank in (0, 1)]
    table = (20, 4)
    state = UnitCheckpoint(runs[holder], "A-12", ThreadRank(0, {}), NullProgress(), table).model_state(model)
    runs[holder].save_checkpoint("A-12", "phase2", {"model": state, "phase2": tensors},
                                 {"phase1": phase1, "phase2": data})
    board: dict[str, Any] = {"barrier": threading.Barrier(2)}
    got: list[Any] = [None, None]

    def rank(r: int) -> None:
        checkpoint = UnitCheckpoint(runs[r], "A-12", ThreadRank(r, board), NullProgress(), table)
        fresh = tiny_model()
        expected = shapes(checkpoint.model_state(fresh))
        saved = checkpoint.load(lambda saved: check_checkpoint(fresh, expected, Phase2Settings(), saved))
        got[r] = None if saved is None else (saved.tensors["model"], saved.state["phase1"], Phase2State.from_checkpoint(
            saved.tensors["phase2"], saved.state["phase2"]))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if holder == 1:
        assert got == [None, None]
        return
    (weights0, phase1_0, state0), (weights1, phase1_1, state1) = got
    assert phase1_0 == phase1_1 == phase1
    assert weights0.keys() == weights1.keys() and all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert state1.history == state0.history and state1.best_val_loss == 2.5
    assert all(torch.equal(state0.model[k], state1.model[k]) for k in state0.model)
    assert torch.equal(state1.optimizer["state"][0]["exp_avg"], state0.optimizer["state"][0]["exp_avg"])
    assert state1.rng is not None and saved.rng is not None and torch.equal(state1.rng, saved.rng)
