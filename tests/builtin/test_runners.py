"""Runners: the protocols they implement, cpu basics, the gpu logic behind a fake CUDA backend, and ddp
on a real 2-process gloo group.

Run as a script (`python test_runners.py SCENARIO OUT`) this file is one ddp worker: the tests
start two of them with the variables torchrun would set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from newllm_kit_plugins.runners import ddp as ddp_runner
from newllm_kit_plugins.runners import local as local_runner
from newllm_kit_plugins.runners.ddp import DDPRunner, contiguous_shard
from newllm_kit_plugins.runners.local import CPURunner, GPURunner, RunnerSettings, auto_runner
from pydantic import ValidationError

from newllm_kit.errors import UserError
from newllm_kit.protocols import Collectives, MemoryPolicy, Placement, Runner, missing_members

if TYPE_CHECKING:  # the fixture supplies it; this file also runs as a ddp worker, outside pytest's path
    from fake_cuda import FakeCuda

GiB = 2**30
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
PHASE2_BYTES_PER_TOKEN = int(50257 * 4 * 3.5)  # GPT-2 vocabulary: fp32 logits plus backward


def test_builtin_plugins_register_every_runner_with_the_shared_settings() -> None:
    seen: dict[str, Any] = {}

    def register(name: str, factory: Any, *, settings: Any = None, description: str = "") -> None:
        assert description
        seen[name] = settings

    local_runner.register_runners(register)
    ddp_runner.register_runners(register)
    assert seen == dict.fromkeys(["cpu", "gpu", "auto", "ddp"], RunnerSettings)


def test_settings_reject_unknown_keys_and_an_empty_batch_range() -> None:
    with pytest.raises(ValidationError, match="extra"):
        RunnerSettings.model_validate({"thread": 2})
    with pytest.raises(ValidationError, match="min_batch 512 is larger than max_batch 256"):
        RunnerSettings(min_batch=512, max_batch=256)


def test_context_store_settings_are_validated_and_described() -> None:
    settings = RunnerSettings.model_validate({"context_store": "disk", "context_dtype": "bf16"})
    described = CPURunner(settings).describe()
    assert (described["context_store"], described["context_dtype"]) == ("disk", "bf16")
    assert (RunnerSettings().context_store, RunnerSettings().context_dtype) == ("auto", "fp32")
    with pytest.raises(ValidationError, match="context_store"):
        RunnerSettings.model_validate({"context_store": "ram"})
    with pytest.raises(ValidationError, match="context_dtype"):
        RunnerSettings.model_validate({"context_dtype": "fp16"})


# --- the protocols -------------------------------------------------------------------------------

def built_in_runners() -> dict[str, Any]:
    """One of each built-in runner, built on the active (fake) CUDA backend; ddp as rank 1 of 2."""
    settings = RunnerSettings(context_store="disk", context_dtype="bf16", memory_fraction=0.25)
    return {"cpu": CPURunner(settings), "gpu": GPURunner(settings), "auto": auto_runner(settings),
            "ddp": DDPRunner(settings, TORCHRUN_ENV)}


@pytest.mark.parametrize("protocol", [Placement, MemoryPolicy, Collectives, Runner])
def test_every_built_in_runner_implements_each_concern(fake_cuda: FakeCuda, protocol: type) -> None:
    for name, runner in built_in_runners().items():
        assert isinstance(runner, protocol), name
        assert missing_members(runner, protocol) == [], name


def test_the_store_policy_is_the_runner_s_own_members(fake_cuda: FakeCuda) -> None:
    """`[runner]` context_store, context_dtype and memory_fraction become MemoryPolicy members (ddp's
    come from the single-device runner it delegates to), and describe() records them."""
    for name, runner in built_in_runners().items():
        policy = (runner.context_store, runner.context_dtype, runner.memory_fraction)
        assert policy == ("disk", "bf16", 0.25), name
        assert (runner.describe()["context_store"], runner.describe()["context_dtype"]) == ("disk", "bf16"), name
    assert (CPURunner().context_store, CPURunner().context_dtype, CPURunner().memory_fraction) == ("auto", "fp32", 0.5)


def test_a_runner_without_a_concern_is_not_taken_for_one() -> None:
    """Each protocol checks its own members: a placement-only object is no MemoryPolicy or Collectives,
    and a runner lacking the optional store members is still a whole Runner to the build check."""

    class PlacementOnly:
        name, device, precision = "p", torch.device("cpu"), "fp32"

        def setup(self) -> None: ...

        def teardown(self) -> None: ...

        def autocast(self) -> Any: ...

        def describe(self) -> dict[str, Any]:
            return {}

    only = PlacementOnly()
    assert isinstance(only, Placement)
    assert not isinstance(only, MemoryPolicy) and not isinstance(only, Collectives)
    assert missing_members(only, Collectives) == ["all_reduce_sum", "barrier", "broadcast", "neighbour_exchange",
                                                  "rank", "shard", "world_size"]
    assert missing_members(only, MemoryPolicy) == ["batch_size", "handle_oom", "micro_batch"]  # not the store's


# --- cpu -----------------------------------------------------------------------------------------

def test_cpu_runner_sets_threads_for_the_run_and_restores_them() -> None:
    before = torch.get_num_threads()
    runner = CPURunner(RunnerSettings(threads=1))
    runner.setup()
    try:
        assert torch.get_num_threads() == 1
        assert runner.describe()["threads"] == 1
    finally:
        runner.teardown()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_cpu_autocast_runs_matmuls_in_the_chosen_precision(precision: str, dtype: torch.dtype) -> None:
    runner = CPURunner(RunnerSettings.model_validate({"precision": precision}))
    weight, x = torch.randn(8, 16), torch.randn(4, 16)
    with runner.autocast():
        out = F.linear(x, weight)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), x @ weight.T, rtol=0.05, atol=0.1)


def test_single_process_collectives_are_identities() -> None:
    runner = CPURunner()
    row = torch.arange(3.0)
    assert (runner.rank, runner.world_size, runner.device) == (0, 1, torch.device("cpu"))
    assert runner.shard(7) == range(7)
    assert runner.neighbour_exchange(row) is row
    assert runner.all_reduce_sum(row) is row
    assert runner.broadcast(row, 0) is row
    runner.barrier()
    assert runner.to_device(row).device == torch.device("cpu")


def test_cpu_batch_is_the_request_or_the_seed_default() -> None:
    runner = CPURunner()
    assert runner.batch_size(1024, PHASE2_BYTES_PER_TOKEN) == 1024
    assert runner.batch_size(None, PHASE2_BYTES_PER_TOKEN) == 512
    with pytest.raises(UserError, match="at least 1"):
        runner.batch_size(0, 1)


# --- gpu, through the fake seam ------------------------------------------------------------------

def test_gpu_runner_selects_the_configured_device_and_tf32(fake_cuda: FakeCuda) -> None:
    runner = GPURunner(RunnerSettings(device_index=1, tf32=False, precision="bf16"))
    runner.setup()
    assert runner.device == torch.device("cuda", 1)
    assert fake_cuda.calls == [("set_device", 1), ("set_tf32", False)]
    info = runner.describe()
    assert (info["device"], info["device_name"], info["tf32"]) == ("cuda:1", "Fake L4", False)
    assert (runner.precision, info["precision"]) == ("bf16", "bf16")


def test_gpu_runner_refuses_a_missing_device_with_a_fix(fake_cuda: FakeCuda) -> None:
    with pytest.raises(UserError, match=r"CUDA device 2 .* only 2 exist"):
        GPURunner(RunnerSettings(device_index=2)).setup()
    fake_cuda.available = False
    with pytest.raises(UserError, match=r'use runner\.name = "cpu"/"auto"'):
        GPURunner(RunnerSettings()).setup()


def test_gpu_batch_cost_model_uses_total_minus_allocated(fake_cuda: FakeCuda) -> None:
    # 24 GiB card, 4 GiB allocated, allocator cache makes the driver report only 1 GiB free:
    # memory the allocator has cached is reusable, so the model sees 20 GiB.
    fake_cuda.total, fake_cuda.allocated, fake_cuda.driver_free = 24 * GiB, 4 * GiB, 1 * GiB
    runner = GPURunner(RunnerSettings())
    expected = int(20 * GiB * 0.5) // PHASE2_BYTES_PER_TOKEN
    assert expected == 15260
    assert runner.batch_size(None, PHASE2_BYTES_PER_TOKEN) == expected
    # the seed's 11/29 margins (safety 0.5 × 0.5) are memory_fraction = 0.25
    seed_like = GPURunner(RunnerSettings(memory_fraction=0.25))
    assert seed_like.batch_size(None, PHASE2_BYTES_PER_TOKEN) == expected // 2
    assert runner.batch_size(700, PHASE2_BYTES_PER_TOKEN) == 700


@pytest.mark.parametrize(("allocated", "expected"), [(int(23.9 * GiB), 256), (0, 16384)])
def test_gpu_batch_is_clamped_to_the_configured_range(fake_cuda: FakeCuda, allocated: int, expected: int) -> None:
    fake_cuda.total, fake_cuda.allocated = 24 * GiB, allocated
    runner = GPURunner(RunnerSettings())
    assert runner.batch_size(None, PHASE2_BYTES_PER_TOKEN) == expected


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, runner: Any, oom_above: int) -> None:
    """One optimiser step's gradient, accumulated over micro-batches; pieces larger than
    `oom_above` raise the error CUDA would, as a Phase-2 loop sees it."""
    batch = len(x)
    while True:
        model.zero_grad()
        micro = runner.micro_batch(batch)
        try:
            for start in range(0, batch, micro):
                xb, yb = x[start:start + micro], y[start:start + micro]
                if len(xb) > oom_above:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                (F.mse_loss(model(xb), yb, reduction="sum") / batch).backward()
            return
        except torch.OutOfMemoryError as error:
            runner.handle_oom(error, batch)


def test_oom_with_auto_batch_halves_the_micro_batch_and_keeps_the_gradient(
        caplog: pytest.LogCaptureFixture, fake_cuda: FakeCuda) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    (F.mse_loss(model(x), y, reduction="sum") / 64).backward()
    full = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    runner = GPURunner(RunnerSettings(auto_batch=True))
    with caplog.at_level(logging.WARNING, logger="newllm_kit"):
        train_step(model, x, y, runner, oom_above=20)

    for grad, expected in zip((p.grad for p in model.parameters()), full, strict=True):
        assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-14)  # type: ignore[arg-type]
    assert runner.micro_batch(64) == 16 and runner.micro_batch(10) == 10
    assert runner.describe()["oom_events"] == [
        {"batch": 64, "old_micro": 64, "new_micro": 32, "phase": "default", "unit": None},
        {"batch": 64, "old_micro": 32, "new_micro": 16, "phase": "default", "unit": None}]
    assert fake_cuda.calls.count(("empty_cache",)) == 2
    assert "retrying with 16" in caplog.text


def test_oom_without_auto_batch_stops_with_the_batch_to_set(fake_cuda: FakeCuda) -> None:
    runner = GPURunner(RunnerSettings())
    with pytest.raises(UserError, match=r"lower the batch size to 512, or runner.auto_batch = true") as info:
        runner.handle_oom(torch.OutOfMemoryError("CUDA out of memory"), 1024)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert runner.describe()["oom_events"] == []


def test_oom_at_micro_batch_one_is_a_user_error_and_other_errors_are_not_handled(fake_cuda: FakeCuda) -> None:
    runner = GPURunner(RunnerSettings(auto_batch=True))
    with pytest.raises(UserError, match="even with a micro-batch of 1"):
        runner.handle_oom(torch.OutOfMemoryError("CUDA out of memory"), 1)
    assert runner.handle_oom(ValueError("not memory"), 8) is False


# --- auto ----------------------------------------------------------------------------------------

def test_auto_picks_cpu_without_cuda_and_says_so(caplog: pytest.LogCaptureFixture, fake_cuda: FakeCuda) -> None:
    fake_cuda.available = False
    with caplog.at_level(logging.INFO, logger="newllm_kit"):
        runner = auto_runner(RunnerSettings())
    assert isinstance(runner, CPURunner)
    assert (runner.name, runner.describe()["resolved"]) == ("auto", "cpu")
    assert "using cpu" in caplog.text


def test_auto_picks_gpu_when_cuda_is_available(fake_cuda: FakeCuda) -> None:
    runner = auto_runner(RunnerSettings(device_index=1))
    assert isinstance(runner, GPURunner)
    assert (runner.name, runner.resolved, runner.device) == ("auto", "gpu", torch.device("cuda", 1))


def test_auto_with_the_real_backend_matches_this_machine() -> None:
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert auto_runner(RunnerSettings()).describe()["resolved"] == expected


# --- ddp -----------------------------------------------------------------------------------------

WORKER_TIMEOUT_S = 20


@given(st.integers(0, 200), st.integers(1, 9))
def test_shards_cover_the_stream_once_with_sizes_within_one(n: int, world: int) -> None:
    shards = [contiguous_shard(n, rank, world) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("missing", ["RANK", "MASTER_PORT"])
def test_ddp_without_torchrun_env_says_how_to_start(missing: str) -> None:
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != missing}
    with pytest.raises(UserError, match=rf"{missing} not set.*`torchrun --nproc_per_node=K -m newllm"):
        DDPRunner(RunnerSettings(), env)


def test_ddp_places_each_rank_on_its_local_gpu_with_nccl(fake_cuda: FakeCuda) -> None:
    gpu = DDPRunner(RunnerSettings(), TORCHRUN_ENV)
    assert (gpu.backend, gpu.device, gpu.rank, gpu.is_main) == ("nccl", torch.device("cuda", 1), 1, False)
    fake_cuda.available = False
    cpu = DDPRunner(RunnerSettings(), TORCHRUN_ENV)
    assert (cpu.backend, cpu.device) == ("gloo", torch.device("cpu"))


def test_ddp_setup_joins_with_the_backend_timeout_and_device(monkeypatch: pytest.MonkeyPatch,
                                                            fake_cuda: FakeCuda) -> None:
    joined: list[dict[str, Any]] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setattr(dist, "is_initialized", lambda: len(joined) == 1)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: joined.append({}))
    runner = DDPRunner(RunnerSettings(timeout_s=7), TORCHRUN_ENV)
    runner.setup()
    expected = {"backend": "nccl", "timeout": timedelta(seconds=7), "device_id": torch.device("cuda:1")}
    assert joined == [expected]
    assert fake_cuda.calls[:2] == [("set_device", 1), ("set_tf32", True)]
    runner.teardown()
    assert len(joined) == 2  # the group it created is destroyed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One two-rank job started with torchrun's variables but no supervisor (which would kill the
    survivor for us): both ranks run the collectives, then rank 1 raises while rank 0 waits on it."""
    tmp, port, procs = tmp_path_factory.mktemp("ddp"), _free_port(), []
    begin = time.monotonic()
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        with (tmp / f"rank{rank}.log").open("w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, str(tmp / f"rank{rank}.json")],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=max(begin + 60 - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail("ddp workers still running after 60 s: a rank hangs")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join((tmp / f"rank{rank}.log").read_text() for rank in range(2))
    records = [json.loads(p.read_text()) if p.exists() else {} for p in sorted(tmp.glob("rank*.json"))]
    return {"codes": [p.returncode for p in procs], "logs": logs, "ranks": records}


def test_ddp_collectives_on_a_real_two_process_gloo_group(ddp_job: dict[str, Any]) -> None:
    ranks = ddp_job["ranks"]
    assert all("batch" in r for r in ranks), ddp_job["logs"]
    assert [i for r in ranks for i in range(*r["shard"])] == list(range(11))
    assert ranks[0]["previous_row"] == [1.0, 11.0] and ranks[1]["previous_row"] == [0.0, 10.0]  # wrap-around
    assert all(r["sum"] == [3.0] and r["broadcast"] == [1.0, 1.0] for r in ranks)
    assert all(r["batch"] == 100 for r in ranks)  # the smallest request wins on every rank


def test_ddp_a_failing_rank_takes_the_job_down_without_hanging(ddp_job: dict[str, Any]) -> None:
    assert all(code != 0 for code in ddp_job["codes"]), ddp_job["logs"]
    assert "rank 1 fails on purpose" in ddp_job["logs"]
    assert not any(r.get("survived") for r in ddp_job["ranks"])
    assert all(r["group_left"] for r in ddp_job["ranks"])  # teardown ran on both ranks
    assert ddp_job["ranks"][0]["waited_s"] < WORKER_TIMEOUT_S  # the peer's exit is noticed, not waited out


def _worker(out: Path) -> None:
    runner = DDPRunner(RunnerSettings(timeout_s=WORKER_TIMEOUT_S))
    runner.setup()
    record: dict[str, Any] = {}
    try:
        rank = float(runner.rank)
        shard = runner.shard(11)
        record["shard"] = [shard.start, shard.stop]
        record["previous_row"] = runner.neighbour_exchange(torch.tensor([rank, 10 + rank])).tolist()
        record["sum"] = runner.all_reduce_sum(torch.tensor([rank + 1])).tolist()
        record["broadcast"] = runner.broadcast(torch.full((2,), rank), src=1).tolist()
        record["batch"] = runner.batch_size(100 + 10 * runner.rank, 1)
        runner.barrier()
        if runner.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        waiting = time.monotonic()
        try:
            runner.all_reduce_sum(torch.ones(1))  # rank 1 never joins: this must fail, not hang
            record["survived"] = True
        finally:
            record["waited_s"] = time.monotonic() - waiting
    finally:
        runner.teardown()
        record["group_left"] = not dist.is_initialized()
        out.write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
