"""Claims on the units of a shared run directory: exclusive, kept alive by a heartbeat, taken over
only from a holder that is gone, and short claims that serialise table rebuilds."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from newllm_kit.claims import Claimed, UnitClaim, gone_because, job_id, read_claim, short_claim


def _holder(**fields: object) -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": "", "token": "t", "started": time.time(),
            "heartbeat": time.time(), "phase": "", **fields}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _race(folder: str, units: list[str], log: str, seed: int) -> None:
    """One of several processes working through the same units in its own order, as jobs do."""
    random.Random(seed).shuffle(units)
    for unit in units:
        claim_file, record = Path(folder, unit, "claim.json"), Path(folder, unit, "record.json")
        if record.exists():
            continue
        try:
            claim = UnitClaim.take(claim_file, 60.0, lambda _: None)
        except Claimed:
            continue
        if record.exists():  # finished between the look and the claim
            claim.release()
            continue
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{unit} {os.getpid()}\n".encode())
        os.close(fd)
        time.sleep(random.Random(seed + len(unit)).random() * 0.01)
        tmp = record.with_name(f".record.{os.getpid()}.tmp")
        tmp.write_text("{}")
        os.replace(tmp, record)
        claim.release()


def test_racing_processes_work_each_unit_exactly_once(tmp_path: Path) -> None:
    units = [f"U-{i}" for i in range(40)]
    for unit in units:
        (tmp_path / unit).mkdir()
    log = tmp_path / "worked.log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_race, args=(str(tmp_path), list(units), str(log), seed)) for seed in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    worked = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(worked) == sorted(units)  # none twice, none lost
    assert len({line.split()[1] for line in log.read_text().splitlines()}) > 1  # they did race
    assert not list(tmp_path.glob("*/claim.json"))


def test_a_live_holder_keeps_its_claim(tmp_path: Path) -> None:
    file = tmp_path / "claim.json"
    file.write_text(json.dumps(_holder(host="elsewhere", pid=1, job="55_2")))
    with pytest.raises(Claimed) as held:
        UnitClaim.take(file, 60.0, pytest.fail)
    assert str(held.value) == "host elsewhere, pid 1, job 55_2"


def test_a_dead_process_on_this_host_loses_its_claim_at_once(tmp_path: Path) -> None:
    file, notes = tmp_path / "claim.json", list[str]()
    pid = _dead_pid()
    file.write_text(json.dumps(_holder(pid=pid)))
    claim = UnitClaim.take(file, 3600.0, notes.append)
    assert notes == [f"warning: {tmp_path.name}: taking over the claim of host {socket.gethostname()}, pid {pid} "
                     f"(pid {pid} is no longer running on {socket.gethostname()})"]
    assert (read_claim(file) or {})["pid"] == os.getpid()
    claim.release()
    assert not file.exists()


def test_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path: Path) -> None:
    file, notes = tmp_path / "claim.json", list[str]()
    file.write_text(json.dumps(_holder(host="elsewhere", pid=1, heartbeat=time.time() - 100)))
    UnitClaim.take(file, 30.0, notes.append).release()
    assert len(notes) == 1 and "its heartbeat is 100 s old, stale after 30 s" in notes[0]


def test_a_requeued_job_takes_its_own_claim_back_without_a_warning(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "812")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert job_id() == "812_3"
    file = tmp_path / "claim.json"
    file.write_text(json.dumps(_holder(host="node7", pid=4242, job="812_3")))
    UnitClaim.take(file, 3600.0, pytest.fail).release()
    assert gone_because(_holder(host="node7", job="812_4"), 0.0, 3600.0) is None


def test_the_heartbeat_keeps_a_claim_fresh_and_notices_a_takeover(tmp_path: Path) -> None:
    file = tmp_path / "claim.json"
    claim = UnitClaim.take(file, 2.0, pytest.fail)  # heartbeat every 0.2 s
    first = (read_claim(file) or {})["heartbeat"]
    time.sleep(0.7)
    claim.beat("phase2")
    now = read_claim(file) or {}
    assert now["heartbeat"] > first and now["phase"] == "phase2"
    file.write_text(json.dumps(_holder(host="elsewhere", pid=1, token="theirs")))
    time.sleep(0.5)
    assert claim.lost is not None and claim.lost["token"] == "theirs"
    claim.release()
    assert (read_claim(file) or {})["token"] == "theirs"  # never removes another's claim


def _count(file: str, times: int) -> None:
    for _ in range(times):
        with short_claim(Path(file).with_suffix(".claim")):
            value = int(Path(file).read_text())
            Path(file).write_text(str(value + 1))


def test_short_claims_let_one_writer_in_at_a_time(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    counter.write_text("0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_count, args=(str(counter), 150)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert counter.read_text() == "600"  # a lost update would leave less


def test_a_short_claim_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    file = tmp_path / ".tables.claim"
    file.write_text(json.dumps(_holder(pid=_dead_pid())))
    with short_claim(file, wait_s=5):
        assert (read_claim(file) or {})["pid"] == os.getpid()
    assert not file.exists()


def test_a_claim_file_left_empty_by_a_dead_creator_is_taken_over(tmp_path: Path) -> None:
    file, notes = tmp_path / "claim.json", list[str]()
    file.write_text("")
    os.utime(file, (time.time() - 60, time.time() - 60))
    UnitClaim.take(file, 3600.0, notes.append).release()
    assert not notes  # no holder to name


def test_a_claim_file_being_written_is_waited_for(tmp_path: Path) -> None:
    file = tmp_path / "claim.json"
    file.write_text("")  # created this instant, holder not yet written

    def write_holder() -> None:
        time.sleep(0.3)
        file.write_text(json.dumps(_holder(host="elsewhere", pid=1)))

    thread = threading.Thread(target=write_holder)
    thread.start()
    with pytest.raises(Claimed):
        UnitClaim.take(file, 3600.0, pytest.fail)
    thread.join()
