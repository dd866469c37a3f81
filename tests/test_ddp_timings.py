"""The ddp runner's bookkeeping, without a process group: per-phase wall time and collective waits, the
teardown line (and its parser, which benchmarks/rehearsal.py uses), LOCAL_WORLD_SIZE and the timeout."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from newllm_kit_plugins.runners import ddp as ddp_runner
from newllm_kit_plugins.runners.ddp import DDPRunner, RankTimings, parse_timings_line, timings_line
from newllm_kit_plugins.runners.local import CPURunner, RunnerSettings

from newllm_kit.errors import UserError

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_collectives_count_towards_the_innermost_open_phase_and_other_outside_any() -> None:
    clock = Clock()
    timings = RankTimings(clock)
    with timings.collective():  # before any phase
        clock.now += 0.5
    with timings.phase("phase1"):
        clock.now += 2.0
        for wait in (0.25, 1.0, 0.5):
            with timings.collective():
                clock.now += wait
        with timings.phase("phase2"):
            with timings.collective():
                clock.now += 0.125
            clock.now += 1.0
    clock.now += 3.0  # outside any phase again

    summary = timings.summary()
    assert summary["total_s"] == pytest.approx(8.375)
    assert summary["phases"] == {
        "phase1": {"seconds": pytest.approx(4.875), "collectives": 3, "waiting_s": pytest.approx(1.75),
                   "longest_s": pytest.approx(1.0)},
        "phase2": {"seconds": pytest.approx(1.125), "collectives": 1, "waiting_s": pytest.approx(0.125),
                   "longest_s": pytest.approx(0.125)},
        "other": {"seconds": pytest.approx(3.5), "collectives": 1, "waiting_s": pytest.approx(0.5),
                  "longest_s": pytest.approx(0.5)},  # 8.375 total − 4.875 in the outermost block
    }
    assert list(summary["phases"]) == ["phase1", "phase2", "other"]


def test_a_phase_entered_again_inside_itself_is_counted_once_and_blocks_add_up() -> None:
    clock = Clock()
    timings = RankTimings(clock)
    for _ in range(3):  # the recipes enter a phase once per pass or epoch
        with timings.phase("phase2"):
            clock.now += 1.0
            with timings.phase("phase2"):
                clock.now += 1.0
    with pytest.raises(RuntimeError), timings.phase("phase1"):  # a failing block still counts, and closes
        clock.now += 4.0
        raise RuntimeError("boom")
    phases = timings.summary()["phases"]
    assert (phases["phase2"]["seconds"], phases["phase1"]["seconds"]) == (pytest.approx(6.0), pytest.approx(4.0))
    assert phases["other"]["seconds"] == pytest.approx(0.0)
    with timings.collective():
        pass
    assert timings.summary()["phases"]["other"]["collectives"] == 1  # no block is left open


def test_the_teardown_line_reads_back_to_the_same_numbers() -> None:
    clock = Clock()
    timings = RankTimings(clock)
    with timings.phase("phase1"):
        for _ in range(1204):
            with timings.collective():
                clock.now += 0.0025
        clock.now += 38.2
    line = timings_line(1, 2, 812 * 2**20, timings.summary())
    assert line.startswith("ddp rank 1/2: peak RSS 812.0 MiB; total 41.2 s; phase1 41.2 s (collectives 1,204, "
                           "waiting 3.01 s, longest 0.00 s); other 0.0 s (collectives 0,")
    parsed = parse_timings_line("[default1]:" + line + "\n")  # a launcher's prefix is ignored
    assert parsed is not None
    assert (parsed["rank"], parsed["world_size"], parsed["peak_rss_bytes"]) == (1, 2, 812 * 2**20)
    assert parsed["phases"]["phase1"] == {"seconds": 41.2, "collectives": 1204, "waiting_s": 3.01, "longest_s": 0.0}
    assert parse_timings_line("[12:00:01] A-300 phase2: start") is None
    assert parse_timings_line(line.replace("waiting", "waited")) is None


def _fake_collectives(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    def fake(name: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> None:
            calls.append(name)
        return run

    for name in ("all_reduce", "all_gather", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, fake(name))


def test_every_collective_of_the_runner_is_timed_in_the_phase_it_runs_in(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    _fake_collectives(monkeypatch, calls)
    runner = DDPRunner(RunnerSettings(), TORCHRUN_ENV)
    runner.batch_size(64, 4)
    with runner.memory_phase("phase1"):
        runner.neighbour_exchange(torch.zeros(3))
        runner.all_reduce_sum(torch.zeros(2))
        assert runner.local._phase == "phase1"  # the local runner's micro-batch cap follows the phase
    with runner.memory_phase("phase2"):
        runner.broadcast(torch.zeros(1), 0)
        runner.barrier()
    assert runner.local._phase == "default"
    assert calls == ["all_reduce", "all_gather", "all_reduce", "broadcast", "barrier"]

    before = ddp_runner.peak_rss_bytes()
    timings = runner.timings()
    after = ddp_runner.peak_rss_bytes()  # a peak never falls: the timings' one lies between the two reads
    assert (timings["rank"], timings["world_size"], timings["local_world_size"]) == (1, 2, 1)
    assert before <= timings["peak_rss_bytes"] <= after
    assert {name: entry["collectives"] for name, entry in timings["phases"].items()} == {
        "phase1": 2, "phase2": 2, "other": 1}

    runner.teardown()
    runner.teardown()  # reported once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ddp rank")]
    assert len(lines) == 1
    parsed = parse_timings_line(lines[0])
    assert parsed is not None and list(parsed["phases"]) == ["phase1", "phase2", "other"]


def test_the_line_goes_to_the_newllm_kit_logger_when_info_is_handled(caplog: pytest.LogCaptureFixture,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    runner = DDPRunner(RunnerSettings(), TORCHRUN_ENV)
    with caplog.at_level(logging.INFO, logger="newllm_kit"):
        runner.teardown()
    assert [r.getMessage()[:14] for r in caplog.records if r.name == "newllm_kit"] == ["ddp rank 1/2: "]
    assert "ddp rank" not in capsys.readouterr().err


def test_setup_starts_the_clock_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    calls: list[str] = []
    _fake_collectives(monkeypatch, calls)
    runner = DDPRunner(RunnerSettings(), TORCHRUN_ENV)
    runner.barrier()
    runner.setup()
    assert runner.timings()["phases"]["other"]["collectives"] == 0


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("", 1), ("4", 4), (" 2 ", 2)])
def test_local_world_size_comes_from_torchrun_and_defaults_to_one(value: str | None, expected: int) -> None:
    env = TORCHRUN_ENV if value is None else {**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": value}
    runner = DDPRunner(RunnerSettings(), env)
    assert runner.local_world_size == expected
    assert (runner.describe()["local_world_size"], runner.describe()["timeout_s"]) == (expected, 1800)
    assert CPURunner().local_world_size == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_local_world_size_is_one_line_naming_it(value: str) -> None:
    with pytest.raises(UserError, match=rf"^LOCAL_WORLD_SIZE must be an integer ≥ 1, got '{re.escape(value)}'; "
                                        r"start with `torchrun") as raised:
        DDPRunner(RunnerSettings(), {**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": value})
    assert "\n" not in str(raised.value)


def test_the_collective_timeout_defaults_to_30_minutes_and_stays_settable() -> None:
    assert RunnerSettings().timeout_s == 1800
    assert RunnerSettings.model_validate({"timeout_s": 20}).timeout_s == 20
    described = RunnerSettings.model_fields["timeout_s"].description or ""
    assert "longest" in described and "checkpoint" in described


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is read from /proc (Linux)")
def test_peak_rss_is_this_process_alone() -> None:
    """A torchrun worker's peak must not include its launcher's: a child started by a process that
    touched 400 MB reports its own peak (ru_maxrss would start at the parent's)."""
    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"x" * len(range(0, len(ballast), 4096))  # touch every page: resident
    child = subprocess.run([sys.executable, "-c", "from newllm_kit_plugins.runners.ddp import peak_rss_bytes; "
                            "print(peak_rss_bytes())"], capture_output=True, text=True, check=True)
    del ballast
    assert int(child.stdout) < 300 * 2**20  # the child's own interpreter and imports, not the 400 MB
    assert ddp_runner.peak_rss_bytes() >= 400 * 2**20  # this process's own peak does include them
