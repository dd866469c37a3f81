"""Damaged or planted state in a run directory: a checkpoint field of the wrong type or range restarts
its unit, a symbolic link leading out of the run is refused before any training, and no record of
results.jsonl is deleted silently."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from newllm_kit_plugins.cvfp import recipe as cvfp_recipe
from newllm_kit_plugins.cvfp.checkpoint_fit import check_checkpoint, shapes
from newllm_kit_plugins.cvfp.phase2 import Phase2Settings
from newllm_kit_plugins.lm import recipe as lm_recipe
from newllm_kit_plugins.runners.local import CPURunner
from test_experiment import TINY, read_results, without_timings, write_tiny
from test_lm import MemoryCheckpoint, data_for, pattern_stream, recipe, tiny_transformer, unit_for
from test_rundir import SMALL, copy_of, phase2_state, run_dir_of, tiny_model, write_lock
from torch import nn

from newllm_kit import experiment, rundir
from newllm_kit.errors import RunInterrupted, UserError
from newllm_kit.plots import write_plots
from newllm_kit.plugins import load_plugins
from newllm_kit.progress import NullProgress
from newllm_kit.protocols import EvalOutputs, Saved
from newllm_kit.run import execute
from newllm_kit.rundir import CheckpointUnreadable, RunDir
from newllm_kit.train_state import TrainState
from newllm_kit.training import train_epochs
from newllm_kit.unit_checkpoint import UnitCheckpoint

Damage = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]


@pytest.fixture(scope="module")
def plugins() -> Any:
    return load_plugins()


# -- the shared training state: every field checked before use --------------------------------------

def _trained(epochs: int = 2) -> tuple[nn.Module, list[nn.Parameter], torch.optim.Optimizer, list[TrainState]]:
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    params = list(module.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01)
    data = torch.randn(16, 4)

    def run_epoch(epoch: int) -> tuple[float, int]:
        optimizer.zero_grad()
        loss = module(data).pow(2).sum()
        loss.backward()
        optimizer.step()
        return float(loss.detach()), 16

    def evaluate() -> EvalOutputs:
        return EvalOutputs(nll_sum=float(module(data).pow(2).sum().detach()), count=16)

    states: list[TrainState] = []
    train_epochs(module, params, optimizer, epochs=epochs, patience=5, restore_best=True, phase="t",
                 run_epoch=run_epoch, evaluate=evaluate, progress=NullProgress(), on_epoch_end=states.append)
    return module, params, optimizer, states


def _on_disk(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, data = state.to_checkpoint()
    return safetensors.torch.load(safetensors.torch.save(tensors)), json.loads(json.dumps(data))


def _set(key: str, value: Any) -> Damage:
    return lambda tensors, data: data.__setitem__(key, value)


def _group(key: str, value: Any) -> Damage:
    return lambda tensors, data: data["optimizer"]["param_groups"][0].__setitem__(key, value)


def _tensor(name: str, value: Callable[[torch.Tensor], torch.Tensor] | None) -> Damage:
    def damage(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value(tensors[name])
    return damage


STATE_DAMAGE: dict[str, Damage] = {
    "epoch a string": _set("epoch", "1"), "epoch 999": _set("epoch", 999), "epoch -1": _set("epoch", -1),
    "epoch true": _set("epoch", True), "best_epoch 0": _set("best_epoch", 0), "counter 3": _set("counter", 3),
    "no history": lambda tensors, data: data.pop("history"), "history cut": lambda t, d: d["history"].pop(),
    "history row without val_loss": lambda t, d: d["history"][0].pop("val_loss"),
    "best_val_loss a string": _set("best_val_loss", "x"), "best_val_loss moved": _set("best_val_loss", 0.123),
    "no best_val": _set("best_val", None), "best_val count 0": lambda t, d: d["best_val"].__setitem__("count", 0),
    "seconds -5": _set("seconds", -5), "not an object": lambda t, d: d.clear(),
    "no optimizer": lambda t, d: d.pop("optimizer"), "lr a string": _group("lr", "x"),
    "weight_decay not configured": _group("weight_decay", 0.5), "betas a string": _group("betas", "no"),
    "two groups": lambda t, d: d["optimizer"]["param_groups"].append(d["optimizer"]["param_groups"][0]),
    "no Adam step": _tensor("optimizer/0/step", None), "no exp_avg": _tensor("optimizer/0/exp_avg", None),
    "exp_avg of another shape": _tensor("optimizer/0/exp_avg", lambda t: t[:1]),
    "negative exp_avg_sq": _tensor("optimizer/0/exp_avg_sq", lambda t: -1 - t),
    "weight NaN": _tensor("model/weight", lambda t: t * math_nan()),
    "weight of another shape": _tensor("model/weight", lambda t: t.T), "no bias": _tensor("model/bias", None),
    "no best weights": _tensor("best/bias", None), "weight int": _tensor("model/weight", lambda t: t.long()),
    "rng cut": _tensor("rng", lambda t: t[:10]), "no rng": _tensor("rng", None),
    "unknown tensor": lambda t, d: t.__setitem__("planted", torch.zeros(1)),
}


def math_nan() -> float:
    return float("nan")


def _resume_check(tensors: dict[str, torch.Tensor], data: Any, epochs: int = 2) -> None:
    module, params, optimizer, _ = _fresh()
    TrainState.from_checkpoint(tensors, data).check_resume(module, params, optimizer, epochs=epochs, patience=5,
                                                           restore_best=True)


def _fresh() -> tuple[nn.Module, list[nn.Parameter], torch.optim.Optimizer, None]:
    torch.manual_seed(1)
    module = nn.Linear(4, 3)
    params = list(module.parameters())
    return module, params, torch.optim.AdamW(params, lr=0.01), None


def test_an_undamaged_training_state_continues_and_leaves_the_model_untouched() -> None:
    *_, states = _trained()
    module, params, optimizer, _ = _fresh()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for state in states:
        tensors, data = _on_disk(state)
        TrainState.from_checkpoint(tensors, data).check_resume(module, params, optimizer, epochs=2, patience=5,
                                                               restore_best=True)
        assert torch.equal(tensors["optimizer/0/exp_avg"], state.optimizer["state"][0]["exp_avg"])  # probe copied
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert not optimizer.state


@pytest.mark.parametrize("damage", list(STATE_DAMAGE.values()), ids=list(STATE_DAMAGE))
def test_every_damaged_training_state_field_is_a_value_error(damage: Damage) -> None:
    *_, states = _trained()
    tensors, data = _on_disk(states[-1])
    damage(tensors, data)
    with pytest.raises(ValueError):
        _resume_check(tensors, data)


def test_an_epoch_beyond_the_configured_epochs_is_refused() -> None:
    *_, states = _trained(epochs=2)
    with pytest.raises(ValueError, match=r"epoch 2 is not within the configured 1 … 1 epochs"):
        _resume_check(*_on_disk(states[-1]), epochs=1)


# -- the recipes' checks --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    checkpoint = MemoryCheckpoint()
    recipe(epochs=2).train(tiny_transformer(), data_for(pattern_stream(100), pattern_stream(30)),
                           unit_for(tmp_path_factory.mktemp("lm"), checkpoint=checkpoint))
    assert checkpoint.saved is not None
    return checkpoint.saved


def _lm_check(saved: Saved) -> None:
    settings, model = recipe(epochs=2).settings, tiny_transformer()
    params = [p for p in model.param_groups()["train"] if p.requires_grad]
    lm_recipe._checkpoint_fits(model, params, lm_recipe._optimizer(model, params, settings), 8, settings,
                               carried=False)(saved)


LM_DAMAGE: dict[str, Callable[[Saved], Any]] = {
    "batch_size 0": lambda s: s.state["lm"].__setitem__("batch_size", 0),
    "batch_size -5": lambda s: s.state["lm"].__setitem__("batch_size", -5),
    "batch_size a string": lambda s: s.state["lm"].__setitem__("batch_size", "4"),
    "batch_size true": lambda s: s.state["lm"].__setitem__("batch_size", True),
    "batch_size not configured": lambda s: s.state["lm"].__setitem__("batch_size", 5),
    "window a string": lambda s: s.state["lm"].__setitem__("window", "8"),
    "a carried state": lambda s: s.state["lm"].__setitem__("state", "carried"),
    "lm not an object": lambda s: s.state.__setitem__("lm", [4, 8]),
    "no lm": lambda s: s.state.pop("lm"), "no train tensors": lambda s: s.tensors.pop("train"),
    "epoch 999": lambda s: s.state["train"].__setitem__("epoch", 999),
    "weight NaN": lambda s: next(iter(s.tensors["model"].values())).fill_(float("nan")),
    "stage": lambda s: s.state.__setitem__("stage", "phase2"),  # replaced below: Saved is immutable
}


def test_an_undamaged_lm_checkpoint_fits(lm_saved: Saved) -> None:
    _lm_check(copy.deepcopy(lm_saved))


@pytest.mark.parametrize("damage", list(LM_DAMAGE.values()), ids=list(LM_DAMAGE))
def test_every_damaged_lm_checkpoint_field_is_a_value_error(lm_saved: Saved, damage: Callable[[Saved], Any]
                                                           ) -> None:
    saved = copy.deepcopy(lm_saved)
    damage(saved)
    if "stage" in saved.state:
        saved = Saved(saved.state.pop("stage"), saved.tensors, saved.state)
    with pytest.raises(ValueError):
        _lm_check(saved)


def _cvfp_saved() -> tuple[nn.Module, Saved]:
    model = tiny_model()
    tensors, data = phase2_state(model).to_checkpoint()
    phase1 = {"iterations": 3, "convergence_rate": 0.5, "token_evaluations": 60, "seconds": 1.0, "train_er": 0.5,
              "stopped_by": "max_iterations", "target_rate": 0.9}
    model_state = UnitCheckpoint(run_dir_of_memory(), "A-12", CPURunner(), NullProgress(), (20, 4)).model_state(model)
    saved = Saved("phase2", {"model": {k: v.clone() for k, v in model_state.items()},
                             "phase2": safetensors.torch.load(safetensors.torch.save(tensors))},
                  json.loads(json.dumps({"phase1": phase1, "phase2": data})))
    return tiny_model(), saved


def run_dir_of_memory() -> RunDir:
    return RunDir(Path("/nonexistent"))


def _cvfp_check(model: nn.Module, saved: Saved) -> None:
    expected = shapes(UnitCheckpoint(run_dir_of_memory(), "A-12", CPURunner(), NullProgress(),
                                                  (20, 4)).model_state(model))
    check_checkpoint(model, expected, Phase2Settings(), saved)


CVFP_DAMAGE: dict[str, Callable[[Saved], Any]] = {
    "iterations a string": lambda s: s.state["phase1"].__setitem__("iterations", "3"),
    "convergence_rate 2": lambda s: s.state["phase1"].__setitem__("convergence_rate", 2),
    "target_rate a string": lambda s: s.state["phase1"].__setitem__("target_rate", "x"),
    "stopped_by other": lambda s: s.state["phase1"].__setitem__("stopped_by", "sometimes"),
    "phase1 not an object": lambda s: s.state.__setitem__("phase1", 3),
    "no phase2 tensors": lambda s: s.tensors.pop("phase2"),
    "phase2 epoch 999": lambda s: s.state["phase2"].__setitem__("epoch", 999),
    "phase2 counter a string": lambda s: s.state["phase2"].__setitem__("counter", "0"),
    "phase2 lr other than configured": lambda s: s.state["phase2"]["optimizer"]["param_groups"][0].__setitem__(
        "lr", 0.5),
    "weight NaN": lambda s: next(iter(s.tensors["model"].values())).fill_(float("nan")),
}


def test_an_undamaged_cvfp_checkpoint_fits() -> None:
    _cvfp_check(*_cvfp_saved())


@pytest.mark.parametrize("damage", list(CVFP_DAMAGE.values()), ids=list(CVFP_DAMAGE))
def test_every_damaged_cvfp_checkpoint_field_is_a_value_error(damage: Callable[[Saved], Any]) -> None:
    model, saved = _cvfp_saved()
    damage(saved)
    with pytest.raises(ValueError):
        _cvfp_check(model, saved)


@pytest.mark.parametrize("error", [AttributeError("x"), ZeroDivisionError("division by zero"), IndexError("i"),
                                   TypeError("t"), KeyError("k"), OverflowError("o")])
def test_any_error_of_a_check_restarts_the_unit_in_one_line(tmp_path: Path, error: Exception) -> None:
    run, notes = run_dir_of(tmp_path), list[str]()
    run.save_checkpoint("A-12", "lm", {"model": {"w": torch.zeros(2)}}, {"lm": {}})

    class Notes(NullProgress):
        def message(self, text: str) -> None:
            notes.append(text)

    def check(saved: Saved) -> None:
        raise error

    assert UnitCheckpoint(run, "A-12", CPURunner(), Notes(), (20, 4)).load(check) is None
    assert len(notes) == 1 and "\n" not in notes[0] and "starting the unit over" in notes[0]
    assert not (run.path / "checkpoints" / "A-12").exists()


# -- paths out of the run directory ------------------------------------------------------------------

def test_latest_naming_a_linked_folder_is_not_followed(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path)
    run.save_checkpoint("A-12", "phase1", {"model": {"w": torch.zeros(2)}}, {"phase1": {}})
    unit_dir = run.path / "checkpoints" / "A-12"
    real = unit_dir / (unit_dir / "LATEST").read_text()
    outside = tmp_path / "elsewhere"
    shutil.move(real, outside)
    real.symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointUnreadable, match="not a checkpoint folder"):
        run.load_checkpoint("A-12")


def test_a_linked_file_inside_the_checkpoint_folder_is_not_read(tmp_path: Path) -> None:
    run = run_dir_of(tmp_path)
    run.save_checkpoint("A-12", "phase1", {"model": {"w": torch.zeros(2)}}, {"phase1": {}})
    folder = run.path / "checkpoints" / "A-12" / (run.path / "checkpoints" / "A-12" / "LATEST").read_text()
    shutil.move(folder / "state.json", tmp_path / "state.json")
    (folder / "state.json").symlink_to(tmp_path / "state.json")
    with pytest.raises(CheckpointUnreadable, match="symbolic link"):
        run.load_checkpoint("A-12")


@pytest.fixture
def stopped(tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory stopped at its first unit, before any training (as a Ctrl-C would)."""
    monkeypatch.setattr(experiment, "run_unit", _raise(KeyboardInterrupt()))
    with pytest.raises(RunInterrupted) as stopped:
        execute(write_tiny(tmp_path), SMALL, tmp_path / "runs", False, "none", plugins)
    return Path(stopped.value.run_dir)


def _raise(error: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error
    return fail


def _plant_plots(run_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (run_dir / "plots").symlink_to(outside, target_is_directory=True)


def _plant_results(run_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (outside / "results.jsonl").write_text("")
    (run_dir / "results.jsonl").symlink_to(outside / "results.jsonl")


def _plant_summary(run_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (run_dir / "summary.json").symlink_to(outside / "summary.json")  # dangling: still leads out


def _plant_checkpoint_child(run_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (run_dir / "checkpoints" / "B-12").mkdir(parents=True)
    (run_dir / "checkpoints" / "B-12" / "LATEST").write_text("phase2-abcdef")
    (run_dir / "checkpoints" / "B-12" / "phase2-abcdef").symlink_to(outside, target_is_directory=True)


def _plant_store(run_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (run_dir / "store").symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("plant", [_plant_plots, _plant_results, _plant_summary, _plant_checkpoint_child,
                                   _plant_store])
def test_a_link_out_of_the_run_directory_is_refused_before_any_training(
        stopped: Path, tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch,
        plant: Callable[[Path, Path], None]) -> None:
    outside = tmp_path / "outside"
    plant(stopped, outside)
    before = sorted(p.name for p in outside.iterdir())
    meta = (stopped / "meta.json").read_text()
    monkeypatch.setattr(experiment, "run_unit", lambda *a, **k: pytest.fail("a unit trained"))
    with pytest.raises(UserError, match=r"a symbolic link to .*, outside the run directory; .* run again$"):
        execute(stopped, [], tmp_path, False, "none", plugins)
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (stopped / "meta.json").read_text() == meta and not (stopped / ".lock").exists()


def test_plots_are_never_drawn_through_a_linked_plots_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.jsonl").write_text(json.dumps(_record("A", 12)) + "\n")
    outside = tmp_path / "outside"
    _plant_plots(run_dir, outside)
    with pytest.raises(UserError, match=r"plots: outside the run directory"):
        write_plots(run_dir)
    assert not list(outside.iterdir())


# -- no record deleted silently ----------------------------------------------------------------------

def _record(model: str, samples: int, **fields: Any) -> dict[str, Any]:
    return {"model": model, "samples": samples, "train_tokens": 10 * samples, "val_tokens": 90, "recipe": "cvfp",
            "val_ppl": 12.5, "val_acc": 0.25, "metrics": {}, "columns": [], "flags": {}, "notes": [], **fields}


@pytest.fixture
def finished(tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished run of A-12 and B-12 whose records are made up (no training)."""
    monkeypatch.setattr(experiment, "run_unit", lambda config, unit, *a, **k: _record(unit.label, unit.samples))
    return Path(execute(write_tiny(tmp_path), SMALL, tmp_path / "runs", False, "none", plugins)["run_dir"])


def test_records_of_units_outside_the_plan_are_kept_in_orphans_with_a_warning(
        finished: Path, tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(finished / "units")  # a run written before each record had a file of its own
    results = finished / "results.jsonl"
    lines = results.read_text().splitlines()
    orphan, twin = json.dumps(_record("Z", 12, seed=7)), json.dumps(_record("A", 12, seed=7, val_ppl=99.0))
    results.write_text("\n".join([lines[0], orphan, lines[1], twin]) + "\n")
    monkeypatch.setattr(experiment, "run_unit", lambda *a, **k: pytest.fail("a finished unit ran again"))
    for _ in range(2):  # a second resume moves nothing twice
        execute(finished, [], tmp_path, False, "plain", plugins)
    err = capsys.readouterr().err
    assert f"warning: {results}:2: a record of a unit not in this run's plan; moved to results.orphans.jsonl" in err
    assert f"warning: {results}:4: a second record of one unit; the first is kept; moved to" in err
    assert (finished / "results.orphans.jsonl").read_text() == f"{orphan}\n{twin}\n"
    assert results.read_text().splitlines() == lines


@pytest.mark.parametrize("field,value", [("seed", "abc"), ("train_tokens", None), ("val_ppl", "x"),
                                         ("samples", True), ("columns", 3)])
@pytest.mark.parametrize("legacy", [False, True])
def test_a_tampered_record_is_named_kept_and_its_unit_recomputed(
        finished: Path, tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], field: str, value: Any, legacy: bool) -> None:
    """The unit's record file (or, in a run written before records had files, its results.jsonl line)."""
    results = finished / "results.jsonl"
    lines = results.read_text().splitlines()
    record = json.loads(lines[1])
    if value is None:
        del record[field]
    else:
        record[field] = value
    tampered = json.dumps(record)
    if legacy:
        shutil.rmtree(finished / "units")
        results.write_text(f"{lines[0]}\n{tampered}\n")
        where = f"{results}:2"
    else:
        (finished / "units" / "B-12" / "record.json").write_text(tampered)
        where = str(finished / "units" / "B-12" / "record.json")
    ran: list[str] = []

    def run_unit(config: Any, unit: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        ran.append(unit.id)
        return _record(unit.label, unit.samples)

    monkeypatch.setattr(experiment, "run_unit", run_unit)
    execute(finished, [], tmp_path, False, "plain", plugins)
    err = capsys.readouterr().err
    assert re.search(rf"warning: {re.escape(where)}: unreadable record \((no )?{field}", err), err
    assert "Traceback" not in err
    assert ran == ["B-12"]
    assert (finished / "results.orphans.jsonl").read_text() == f"{tampered}\n"
    assert [json.loads(line)["model"] for line in results.read_text().splitlines()] == ["A", "B"]


def test_a_damaged_results_table_is_rebuilt_from_the_unit_records(
        finished: Path, tmp_path: Path, plugins: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """results.jsonl is a table made from units/<id>/record.json: damaging it loses nothing."""
    results = finished / "results.jsonl"
    before = results.read_text()
    results.write_text("not json\n{}\n")
    monkeypatch.setattr(experiment, "run_unit", lambda *a, **k: pytest.fail("a finished unit ran again"))
    execute(finished, [], tmp_path, False, "plain", plugins)
    assert results.read_text() == before


# -- locks and full disks ----------------------------------------------------------------------------

def test_a_lock_with_a_pid_beyond_pid_t_is_taken_over(tmp_path: Path) -> None:
    run, notes = run_dir_of(tmp_path), list[str]()
    write_lock(run, 99999999999999999999)
    run.lock(notes.append)
    assert notes and "taking over the lock of pid 99999999999999999999" in notes[0]
    run.unlock()


def test_a_full_disk_before_the_first_write_says_to_start_again(tmp_path: Path, plugins: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "atomic_write_bytes", full)
    with pytest.raises(UserError) as error:
        execute(write_tiny(tmp_path), SMALL, tmp_path / "runs", False, "none", plugins)
    message = str(error.value)
    assert "config.resolved.toml: cannot write (No space left on device); free space and start the run again" \
        in message and "continue with" not in message


# -- end to end: a damaged field restarts the unit and the results are those of an uninterrupted run -----

LM_TINY = """
[experiment]
name = "tinylm"
samples = [12]
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

[lm]
epochs = 3
patience = 3
batch_size = 4
window = 16
warmup_steps = 2
learning_rate = 0.003

[runner]
name = "cpu"

[[models]]
label = "G"
architecture = "gru"
layers = 1
hidden_size = 16
embedding_dim = 16
"""


def _stop_after_first_epoch(module: Any, name: str) -> Callable[..., Any]:
    real = getattr(module, name)

    def train(*args: Any, on_epoch_end: Any, **kwargs: Any) -> Any:
        def then_stop(state: TrainState) -> None:
            on_epoch_end(state)
            raise KeyboardInterrupt

        return real(*args, on_epoch_end=then_stop, **kwargs)

    return train


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory: pytest.TempPathFactory, plugins: Any) -> tuple[list[dict[str, Any]], Path, Path]:
    """(an uninterrupted lm run's records, a run stopped after G-12's first epoch, the uninterrupted run)."""
    tmp = tmp_path_factory.mktemp("lm")
    whole = execute(write_tiny(tmp, LM_TINY), [], tmp / "runs", False, "none", plugins)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RunInterrupted) as stopped:
        patch.setattr(lm_recipe, "train_epochs", _stop_after_first_epoch(lm_recipe, "train_epochs"))
        execute(write_tiny(tmp, LM_TINY), [], tmp / "runs", False, "none", plugins)
    return whole["results"], Path(stopped.value.run_dir), Path(whole["run_dir"])


@pytest.fixture(scope="module")
def cvfp_runs(tmp_path_factory: pytest.TempPathFactory, plugins: Any) -> tuple[list[dict[str, Any]], Path, Path]:
    """(an uninterrupted cvfp run's records, a run stopped after A-12's first Phase-2 epoch, the uninterrupted
    run)."""
    tmp = tmp_path_factory.mktemp("cvfp")
    single = TINY.split('[[models]]\nlabel = "B"')[0]  # model A only: unit A-12
    whole = execute(write_tiny(tmp, single), SMALL, tmp / "runs", False, "none", plugins)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RunInterrupted) as stopped:
        patch.setattr(cvfp_recipe, "train_phase2", _stop_after_first_epoch(cvfp_recipe, "train_phase2"))
        execute(write_tiny(tmp, single), SMALL, tmp / "runs", False, "none", plugins)
    return whole["results"], Path(stopped.value.run_dir), Path(whole["run_dir"])


def _edit_state(run_dir: Path, unit: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    unit_dir = run_dir / "checkpoints" / unit
    state = unit_dir / (unit_dir / "LATEST").read_text() / "state.json"
    data = json.loads(state.read_text())
    edit(data)
    state.write_text(json.dumps(data))
    return unit_dir


END_TO_END = {
    "lm": {"undamaged": lambda d: None, "batch_size 0": lambda d: d["lm"].__setitem__("batch_size", 0),
           "batch_size -5": lambda d: d["lm"].__setitem__("batch_size", -5),
           "batch_size a string": lambda d: d["lm"].__setitem__("batch_size", "4"),
           "epoch 999": lambda d: d["train"].__setitem__("epoch", 999),
           "no history": lambda d: d["train"].pop("history"),
           "best_val count 0": lambda d: d["train"]["best_val"].__setitem__("count", 0),
           "lr a string": lambda d: d["train"]["optimizer"]["param_groups"][0].__setitem__("lr", "x")},
    "cvfp": {"undamaged": lambda d: None, "epoch 999": lambda d: d["phase2"].__setitem__("epoch", 999),
             "epoch a string": lambda d: d["phase2"].__setitem__("epoch", "1"),
             "no counter": lambda d: d["phase2"].pop("counter"),
             "iterations a string": lambda d: d["phase1"].__setitem__("iterations", "3"),
             "target_rate a string": lambda d: d["phase1"].__setitem__("target_rate", "x"),
             "best_val a list": lambda d: d["phase2"].__setitem__("best_val", [1, 2]),
             "weight_decay not configured":
                 lambda d: d["phase2"]["optimizer"]["param_groups"][0].__setitem__("weight_decay", 0.5)},
}


@pytest.mark.slow
@pytest.mark.parametrize("family,damage", [(f, d) for f, cases in END_TO_END.items() for d in cases])
def test_a_damaged_checkpoint_field_restarts_the_unit_with_the_uninterrupted_results(
        family: str, damage: str, request: pytest.FixtureRequest, tmp_path: Path, plugins: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    uninterrupted, stopped, whole = request.getfixturevalue(f"{family}_runs")
    run_dir = copy_of(stopped, tmp_path)
    unit = "G-12" if family == "lm" else "A-12"
    unit_dir = _edit_state(run_dir, unit, END_TO_END[family][damage])
    result = execute(run_dir, [], tmp_path, False, "plain", plugins)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "is unreadable" in line]
    if damage == "undamaged":
        assert not warnings, err
    else:
        assert len(warnings) == 1 and f"warning: {unit}: the checkpoint in {unit_dir.resolve()} is unreadable (" \
            in warnings[0], err
    assert "Traceback" not in err
    assert _comparable(result["results"]) == _comparable(uninterrupted)
    assert _comparable(read_results(run_dir)) == _comparable(read_results(whole))
    assert not (run_dir / "checkpoints").exists()


def _comparable(records: list[dict[str, Any]]) -> str:
    """Records without wall times (also the lm history's per-epoch seconds), as JSON text, where a NaN
    metric equals itself."""
    return json.dumps([{**r, **({"history": [{k: v for k, v in row.items() if k != "seconds"} for row in r["history"]]}
                                if "history" in r else {})} for r in without_timings(records)], sort_keys=True)
