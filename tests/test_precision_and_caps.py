"""Micro-batch caps per phase and per unit, and precision as documented (TF32 flags, teardown, Phase 2's
full-fp32 recompute, a failed pinned allocation as out of memory)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_cuda import FakeCuda
from newllm_kit_plugins.cvfp import phase2
from newllm_kit_plugins.cvfp.context_store import StorePlan, context_stores, is_out_of_memory
from newllm_kit_plugins.cvfp.phase2 import Phase2Data, context_agreement
from newllm_kit_plugins.runners.local import CPURunner, GPURunner, RunnerSettings
from test_experiment import TINY, write_tiny
from test_phase2 import CPU, TinyModel
from torch import nn

from newllm_kit import experiment
from newllm_kit.cuda import CudaBackend
from newllm_kit.errors import RunFailed
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute
from newllm_kit.training import loss_pass, memory_phase, start_unit

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def pass_sizes(runner: CPURunner, phase: str, items: int, oom_above: int | None = None) -> list[int]:
    """The micro-batches `loss_pass` runs `items` in under `phase`; pieces above `oom_above` run out of memory."""
    sizes: list[int] = []

    def losses(micro: int) -> Any:
        for start in range(0, items, micro):
            size = min(micro, items - start)
            if oom_above is not None and size > oom_above:
                raise torch.OutOfMemoryError(OOM)
            sizes.append(size)
            yield torch.tensor(0.0), torch.tensor(0)

    loss_pass(nn.Linear(1, 1), runner, items, losses, None, phase=phase)
    return sizes


def test_a_halving_in_one_phase_leaves_the_other_phases_and_the_next_unit_alone() -> None:
    runner = CPURunner(RunnerSettings(auto_batch=True))
    start_unit(runner, "A-12")
    assert pass_sizes(runner, "phase2", 128, oom_above=40) == [32] * 4  # 128 → 64 → 32
    assert pass_sizes(runner, "phase2", 128) == [32] * 4  # the cap holds within its phase and unit
    assert pass_sizes(runner, "lm", 128) == [128]
    with memory_phase(runner, "phase1"):
        assert runner.micro_batch(512) == 512
    with memory_phase(runner, "phase2"):
        assert runner.micro_batch(512) == 32
    assert [(e["phase"], e["unit"], e["old_micro"], e["new_micro"]) for e in runner.describe()["oom_events"]] == [
        ("phase2", "A-12", 128, 64), ("phase2", "A-12", 64, 32)]
    start_unit(runner, "A-24")
    assert pass_sizes(runner, "phase2", 128) == [128]
    assert runner.describe()["micro_batch_caps"] == {}
    assert len(runner.describe()["oom_events"]) == 2  # the record of the run keeps every unit's events


def test_meta_json_records_the_halving_with_its_phase_and_unit_and_the_next_unit_runs_uncapped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one_model = TINY[:TINY.index('\n[[models]]\nlabel = "B"')] + "\n"
    seen: list[tuple[str, int]] = []  # (unit, rows) of each Phase-2 batch
    unit, raised = [""], [False]
    original_batch, original_start = phase2.Phase2Data.batch, experiment.start_unit

    def batch(self: Any, model: Any, rows: range, to: torch.device) -> Any:
        if unit[0] == "A-12" and len(rows) == 128 and not raised[0]:
            raised[0] = True
            raise torch.OutOfMemoryError(OOM)  # once: the first Phase-2 training batch of the first unit
        seen.append((unit[0], len(rows)))
        return original_batch(self, model, rows, to)

    def starting(runner: Any, unit_id: str) -> None:
        unit[0] = unit_id
        original_start(runner, unit_id)

    monkeypatch.setattr(phase2.Phase2Data, "batch", batch)
    monkeypatch.setattr(experiment, "start_unit", starting)
    finished = execute(write_tiny(tmp_path, one_model), ["runner.auto_batch=true"], tmp_path / "runs", False,
                       "none", load_plugins())
    meta = json.loads((Path(finished["run_dir"]) / "meta.json").read_text())
    assert meta["runner"]["oom_events"] == [
        {"batch": 128, "old_micro": 128, "new_micro": 64, "phase": "phase2", "unit": "A-12"}]
    assert 64 in [n for u, n in seen if u == "A-12"] and 128 not in [n for u, n in seen if u == "A-12"]
    assert 128 in [n for u, n in seen if u == "A-24"]  # the next unit starts without the cap


@pytest.fixture
def matmul_precision() -> Iterator[None]:
    """Puts back the process's TF32 settings after a test that changes them."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_drives_cublas_and_cudnn(enabled: bool, matmul_precision: None) -> None:
    torch.set_float32_matmul_precision("high" if not enabled else "highest")
    torch.backends.cudnn.allow_tf32 = not enabled
    CudaBackend().set_tf32(enabled)
    assert torch.backends.cuda.matmul.allow_tf32 is enabled
    assert torch.backends.cudnn.allow_tf32 is enabled  # the GRU's kernels


def test_the_real_backend_restores_what_it_reports(matmul_precision: None) -> None:
    gpu = CudaBackend()
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False
    saved = gpu.tf32_settings()
    gpu.set_tf32(True)
    gpu.restore_tf32(saved)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_gpu_runner_sets_both_flags_and_teardown_restores_them(enabled: bool, fake_cuda: FakeCuda) -> None:
    fake_cuda.matmul_precision, fake_cuda.cudnn_tf32 = "medium", not enabled
    runner = GPURunner(RunnerSettings(tf32=enabled))
    runner.setup()
    assert (fake_cuda.matmul_precision, fake_cuda.cudnn_tf32) == ("high" if enabled else "highest", enabled)
    runner.teardown()
    assert (fake_cuda.matmul_precision, fake_cuda.cudnn_tf32) == ("medium", not enabled)


def recorded_precision(model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The matmul precision in force at each step of `model`'s frozen block."""
    seen: list[str] = []
    step = model.context_block.step

    def recording(*args: Any) -> Any:
        seen.append(torch.get_float32_matmul_precision())
        return step(*args)

    monkeypatch.setattr(model.context_block, "step", recording)
    return seen


def test_phase2_recomputes_its_contexts_in_full_fp32(monkeypatch: pytest.MonkeyPatch, matmul_precision: None
                                                     ) -> None:
    model, ids = TinyModel(), torch.randint(0, 11, (30,), generator=torch.Generator().manual_seed(0))
    data = Phase2Data(torch.randn(30, 4, dtype=torch.float64), ids)
    seen = recorded_precision(model, monkeypatch)
    torch.set_float32_matmul_precision("high")  # what tf32 = true leaves in force for training
    data.batch(model, range(3, 17), CPU)
    context_agreement(model, data, torch.randn(12, 4), CPU)
    assert seen == ["highest", "highest"]
    assert torch.get_float32_matmul_precision() == "high"  # put back for the TokenBlock and the head


class PinningRunner:
    """What the stores read of a runner on a CUDA device: host stores are pinned there."""

    device, rank, world_size = torch.device("cuda", 0), 0, 1


PINNED_OOM = ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
              "call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
              "CUDA_LAUNCH_BLOCKING=1")


def test_a_failed_pinned_allocation_is_out_of_memory_with_the_one_line_advice(
        monkeypatch: pytest.MonkeyPatch, fake_cuda: FakeCuda, tmp_path: Path) -> None:
    assert is_out_of_memory(RuntimeError(PINNED_OOM))
    empty = torch.empty

    def no_pinned_memory(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        if pin_memory:
            raise RuntimeError(PINNED_OOM)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinned_memory)
    plan = StorePlan("host", "fp32", 3 * 2**30, "")
    with pytest.raises(RunFailed) as failed, context_stores(plan, {"train": 9}, 3, PinningRunner(), "A-12", tmp_path):
        pass
    assert str(failed.value).startswith(
        "A-12: allocating the context stores: out of memory (RuntimeError); the context stores take "
        "3,221,225,472 bytes (3.0 GiB, host, fp32); set ")
    assert "\n" not in str(failed.value)
