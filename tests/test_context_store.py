"""Context stores: where auto puts them, what an explicit kind that cannot fit says, the three kinds
of memory, removal of disk files, ranks agreeing on one kind, the runner's store policy as read
through `MemoryPolicy`, and free GPU memory as the (fake) CUDA backend reports it."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fake_cuda import FakeCuda
from newllm_kit_plugins.cvfp import context_store
from newllm_kit_plugins.cvfp.context_store import (
    StorePlan,
    allocate,
    context_stores,
    decide,
    free_bytes,
    is_out_of_memory,
    plan_stores,
    settings_of,
)
from newllm_kit_plugins.cvfp.phase2 import Phase2Data
from newllm_kit_plugins.runners.local import CPURunner, RunnerSettings
from test_phase2 import CPU, ThreadRank, TinyModel
from thread_ranks import run_ranks

from newllm_kit import protocols
from newllm_kit.errors import RunFailed, UserError

GiB = 2**30


class Runner(ThreadRank):
    """What the stores read of a runner: device, rank, the store policy (`MemoryPolicy`'s members) and
    (under ddp) a sum over ranks."""

    def __init__(self, rank: int = 0, world_size: int = 1, board: dict[str, Any] | None = None,
                 context_store: str = "auto", context_dtype: str = "fp32", memory_fraction: float = 0.5,
                 device: str = "cpu") -> None:
        super().__init__(rank, world_size, board or {})
        self.context_store, self.context_dtype, self.memory_fraction = context_store, context_dtype, memory_fraction
        self.device = torch.device(device)


@pytest.mark.parametrize(("device_free", "host_free", "on_gpu", "kind"), [
    (10 * GiB, 64 * GiB, True, "device"),  # 4 GiB fit in half of 10
    (6 * GiB, 64 * GiB, True, "host"),
    (6 * GiB, 6 * GiB, True, "disk"),
    (None, 64 * GiB, False, "device"),  # a CPU runner: its device is the host memory
    (None, 6 * GiB, False, "disk"),
    (None, None, False, "device"),  # unknown free memory is taken as room enough
])
def test_auto_takes_the_device_then_host_memory_then_disk(device_free: int | None, host_free: int | None,
                                                          on_gpu: bool, kind: str) -> None:
    chosen, reason = decide(4 * GiB, 0.5, device_free, host_free, on_gpu)
    assert chosen == kind and reason


def test_a_plan_says_what_it_chose_and_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(context_store, "available_bytes", lambda device: 64 * GiB)
    plan = plan_stores(Runner(context_dtype="bf16"), 1000, 768, tmp_path / "store")
    assert (plan.kind, plan.dtype, plan.bytes) == ("device", "bf16", 1000 * 768 * 2)
    assert plan.describe() == "context stores on device (bf16, 1.5 MiB): fits in 0.5 × 64.0 GiB free in RAM"
    assert plan.to_json() == {"kind": "device", "dtype": "bf16", "bytes": 1536000, "host_ranks": 1}
    monkeypatch.setattr(context_store, "available_bytes", lambda device: 2 * 10**6)
    assert plan_stores(Runner(), 1000, 768, tmp_path).kind == "disk"


def test_an_explicit_store_that_cannot_fit_fails_before_allocating(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(context_store, "available_bytes", lambda device: GiB)
    with pytest.raises(UserError, match=r'^allocating the context stores: they need 3,145,728,000 bytes \(2\.9 GiB\) '
                                        r'but RAM has 1\.0 GiB free; set runner.context_store = "disk" or '
                                        r'runner.context_dtype = "bf16"$'):
        plan_stores(Runner(context_store="host"), 1024000, 768, tmp_path)
    monkeypatch.setattr(context_store, "disk_free", lambda folder: GiB)
    with pytest.raises(UserError, match=r"but the disk at .* has 1\.0 GiB free; free disk space$"):
        plan_stores(Runner(context_store="disk", context_dtype="bf16"), 1024000, 768, tmp_path)


def test_a_runner_without_store_settings_gets_the_defaults() -> None:
    assert settings_of(object()) == ("auto", "fp32", 0.5)
    bare = ThreadRank(0, 1, {})  # a whole runner that leaves the optional store members out
    assert protocols.missing_members(bare, protocols.Runner) == []
    assert settings_of(bare) == ("auto", "fp32", 0.5)
    assert settings_of(Runner(context_store="disk", memory_fraction=0.25)) == ("disk", "fp32", 0.25)


def test_the_store_policy_is_read_from_the_runner_s_members_not_its_settings() -> None:
    """The policy is part of the runner's protocol: a `settings` object is the runner's own business."""
    only_settings = SimpleNamespace(settings=RunnerSettings(context_store="disk", context_dtype="bf16"))
    assert settings_of(only_settings) == ("auto", "fp32", 0.5)
    built_in = CPURunner(RunnerSettings(context_store="host", context_dtype="bf16", memory_fraction=0.3))
    assert settings_of(built_in) == ("host", "bf16", 0.3)


def test_free_gpu_memory_counts_the_allocator_s_cache(fake_cuda: FakeCuda) -> None:
    """The driver's free memory plus what PyTorch reserved but has not handed out, on the asked device."""
    fake_cuda.driver_free, fake_cuda.reserved, fake_cuda.allocated = 1 * GiB, 6 * GiB, 4 * GiB
    assert free_bytes(torch.device("cuda", 1)) == 3 * GiB
    assert fake_cuda.calls == [("mem_get_info", torch.device("cuda", 1))]


def test_auto_on_a_gpu_takes_the_device_while_the_stores_fit_its_free_memory(
        fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(context_store, "available_bytes", lambda device: 64 * GiB)
    needed = 1000 * 768 * 4
    fake_cuda.driver_free, fake_cuda.reserved, fake_cuda.allocated = 2 * needed, 0, 0
    plan = plan_stores(Runner(device="cuda"), 1000, 768, tmp_path)
    assert (plan.kind, plan.reason) == ("device", "fits in 0.5 × 5.9 MiB free on the device")
    fake_cuda.driver_free = 2 * needed - 1  # half of it is no longer enough
    assert plan_stores(Runner(device="cuda"), 1000, 768, tmp_path).kind == "host"
    assert plan_stores(Runner(device="cuda", memory_fraction=0.6), 1000, 768, tmp_path).kind == "device"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_kind_holds_the_contexts(tmp_path: Path, dtype: str) -> None:
    values = torch.randn(7, 5).to(context_store.DTYPES[dtype])
    for kind in ("device", "host", "disk"):
        store = allocate(StorePlan(kind, dtype, 0, ""), 7, 5, Runner(), tmp_path / f"{kind}.{dtype}")
        store[2:6] = values[2:6]
        assert store.dtype == values.dtype and store.shape == (7, 5) and not store.is_pinned()
        assert torch.equal(store[2:6], values[2:6])
    on_disk = np.memmap(tmp_path / f"disk.{dtype}", dtype=context_store.FILE_TYPES[dtype], mode="r", shape=(7, 5))
    assert torch.equal(torch.from_numpy(np.array(on_disk[2:6])).view(values.dtype), values[2:6])


def test_disk_files_live_while_the_unit_runs_and_are_removed_however_it_ends(tmp_path: Path) -> None:
    folder, plan = tmp_path / "store", StorePlan("disk", "fp32", 0, "")
    with context_stores(plan, {"train": 9, "val": 4}, 3, Runner(), "A-12", folder) as stores:
        assert sorted(p.name for p in folder.iterdir()) == ["A-12-train.fp32", "A-12-val.fp32"]
        assert (folder / "A-12-train.fp32").stat().st_size == 9 * 3 * 4
        assert stores["val"].shape == (4, 3)
    assert not folder.exists()
    with pytest.raises(KeyboardInterrupt), context_stores(plan, {"train": 9}, 3, Runner(1, 2), "A-12", folder):
        assert [p.name for p in folder.iterdir()] == ["A-12-train.rank1.fp32"]  # ranks share the folder
        raise KeyboardInterrupt
    assert not folder.exists()


def test_phase2_reads_a_disk_store_like_one_in_memory(tmp_path: Path) -> None:
    model, ids = TinyModel(), torch.randint(0, 11, (30,), generator=torch.Generator().manual_seed(0))
    contexts = torch.randn(30, 4, dtype=torch.float64)
    with context_stores(StorePlan("disk", "fp32", 0, ""), {"train": 30}, 4, Runner(), "A-1", tmp_path) as stores:
        stores["train"].copy_(contexts)
        from_disk = Phase2Data(stores["train"], ids).batch(model, range(3, 17), CPU)
    in_memory = Phase2Data(contexts.float(), ids).batch(model, range(3, 17), CPU)
    for a, b in zip(from_disk[0], in_memory[0], strict=True):
        assert torch.equal(a, b)


def test_running_out_of_memory_while_allocating_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    def no_memory(*args: Any, **keywords: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(context_store, "allocate", no_memory)
    plan = StorePlan("device", "fp32", 3 * GiB, "")
    with pytest.raises(RunFailed) as failed, context_stores(plan, {"train": 9}, 3, Runner(), "A-12", tmp_path):
        pass
    assert str(failed.value) == (
        'A-12: allocating the context stores: out of memory (OutOfMemoryError); the context stores take '
        '3,221,225,472 bytes (3.0 GiB, device, fp32); set runner.context_store = "host" or "disk" or '
        'runner.context_dtype = "bf16"')


def test_what_counts_as_out_of_memory() -> None:
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000 bytes")
    refused = UserError("out of memory on cuda:0 at batch 1024: lower the batch size to 512")
    refused.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_out_of_memory(torch.OutOfMemoryError()) and is_out_of_memory(cpu) and is_out_of_memory(refused)
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(UserError("bad key"))


@pytest.mark.parametrize(("free_gib", "kind"), [
    ((64, 64, 64), "device"),  # the stores fit in half of every host's RAM
    ((64, 1, 64), "disk"),  # one host short of RAM: every rank takes the disk, not only that one
    ((1, 64, 64), "disk"),  # the short host is rank 0's: the choice is not rank 0's alone
])
def test_ranks_agree_on_the_most_conservative_kind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   free_gib: tuple[int, ...], kind: str) -> None:
    """Three CPU ranks on three hosts (multi-node ddp), each reading its own host's free RAM: every rank
    holds and records the kind the shortest host needs."""
    rank_of = threading.local()
    monkeypatch.setattr(context_store, "available_bytes", lambda device: free_gib[rank_of.value] * GiB)
    board: dict[str, Any] = {"barrier": threading.Barrier(3)}
    plans: list[StorePlan | None] = [None, None, None]

    def rank(r: int) -> None:
        rank_of.value = r
        plans[r] = plan_stores(Runner(r, 3, board), 1024000, 768, tmp_path)

    run_ranks(3, rank)
    assert [(p.kind, p.bytes) if p else None for p in plans] == [(kind, 1024000 * 768 * 4)] * 3
