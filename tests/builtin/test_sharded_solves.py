"""The cvfp recipe at scale: each ddp rank holds only its rows, does one process's sequential work,
and a killed solve or validation check continues from its last save, bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from newllm_kit_plugins.cvfp import frozen_solve, phase1_contexts
from newllm_kit_plugins.cvfp.context_store import StorePlan, allocate
from newllm_kit_plugins.cvfp.diagnostics import convergence_check
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, initial_contexts, stream_shard
from newllm_kit_plugins.cvfp.row_map import batch_rows, gather, redistribute
from newllm_kit_plugins.cvfp.solve_checkpoint import StoreCheckpoint, TrialsCheckpoint
from newllm_kit_plugins.runners.ddp import contiguous_shard
from test_fixed_point import WELL_CONDITIONED, CPURunner, RankView, real_model, tiny
from thread_ranks import BoardCollectives, run_ranks

from newllm_kit.errors import UserError


class Files:
    """The `Checkpointer` file methods over a plain folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.folder / name

    def write_stream(self, name: str, write: Any) -> None:
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            write(handle)
        tmp.replace(self.folder / name)

    def append(self, name: str, write: Any) -> None:
        with open(self.folder / name, "ab") as handle:
            write(handle)


class ThreadRank(BoardCollectives, CPURunner):
    def __init__(self, rank: int, world: int, board: dict[str, Any]) -> None:
        super().__init__()
        self.rank, self.world_size, self.board = rank, world, board

    def shard(self, n: int) -> range:
        return contiguous_shard(n, self.rank, self.world_size)


def board(world: int) -> dict[str, Any]:
    return {"barrier": threading.Barrier(world)}


@pytest.mark.parametrize(("n", "batch", "world"), [(1000, 64, 1), (1000, 64, 2), (1001, 100, 3), (50, 64, 3),
                                                   (10, 2, 4), (7, 1, 3)])
def test_a_rank_holds_its_batch_slices_and_the_ranks_together_hold_each_row_once(n: int, batch: int,
                                                                                   world: int) -> None:
    maps = [batch_rows(n, batch, lambda size, r=r: contiguous_shard(size, r, world)) for r in range(world)]
    rows = sorted(i for where in maps for a, b in where.spans for i in range(a, b))
    assert rows == list(range(n))
    for start in range(0, n - 1, batch):  # every rank's slice of every batch reads rows inside one span
        size = min(batch, n - 1 - start)
        for r in range(world):
            part = contiguous_shard(size, r, world)
            lo, hi = start + part.start, start + part.stop
            if lo < hi:
                held = maps[r].local(max(lo - 1, 0), hi - 1)
                assert held.stop - held.start == hi - 1 - max(lo - 1, 0)
    assert max(where.rows for where in maps) <= n / world + n / batch + 2  # about 1/W of the stream each


def test_rows_are_gathered_and_moved_between_ranks_exactly() -> None:
    n, width, world = 300, 5, 3
    whole = torch.randn(n, width)
    maps = [batch_rows(n, 32, lambda size, r=r: contiguous_shard(size, r, world)) for r in range(world)]
    wanted = torch.tensor([299, 0, 17, 150, 151, 3])
    gathered: list[Any] = [None] * world
    moved: list[Any] = [None] * world
    shared = board(world)

    def rank(r: int) -> None:
        runner = ThreadRank(r, world, shared)
        local = torch.cat([whole[a:b] for a, b in maps[r].spans])
        gathered[r] = gather(local, maps[r], wanted, runner)
        source = contiguous_shard(n, r, world)  # Phase 1's shard, sent to the Phase-2 rows
        moved[r] = torch.full((maps[r].rows, width), float("nan"))
        redistribute(lambda a, b: whole[a:b], source, moved[r], maps[r], runner)

    run_ranks(world, rank)
    for r in range(world):
        assert torch.equal(gathered[r], whole[wanted])
        assert torch.equal(moved[r], torch.cat([whole[a:b] for a, b in maps[r].spans]))


@pytest.mark.parametrize("method", ["sequential", "auto"])
def test_iteration_0_is_one_process_work_on_every_rank(method: str) -> None:
    """No rank stops early and waits in the next collective for the last one's rollout."""
    model, ids = tiny(n=600, **WELL_CONDITIONED)
    settings = CVFPPhase1Settings(solve=method, batch_size=100)
    with torch.no_grad():
        whole, info = initial_contexts(model, ids, range(600), settings, CPURunner())
        for r in range(3):
            rows = stream_shard(600, settings, RankView(r, 3))
            mine, mine_info = initial_contexts(model, ids, rows, settings, RankView(r, 3))
            if method == "sequential":  # the whole rollout on every rank, rows kept bit for bit
                assert mine_info["evaluations"] == info["evaluations"], r
                assert torch.equal(mine, whole[rows.start:rows.stop]), r
            else:  # the chunked scan covers the whole stream; only the run-on checks are the rank's own
                assert abs(mine_info["evaluations"] - info["evaluations"]) <= 0.1 * info["evaluations"], r
                assert (mine - whole[rows.start:rows.stop]).abs().max() <= 1e-5, r


def test_a_random_iteration_0_is_the_rows_of_one_whole_draw() -> None:
    model, ids = tiny(n=20_000, **WELL_CONDITIONED)
    settings = CVFPPhase1Settings(init="random", batch_size=1000)
    torch.manual_seed(5)
    whole = torch.randn(20_000, 8).mul_(0.01)
    for r in range(3):
        rows = stream_shard(20_000, settings, RankView(r, 3))
        torch.manual_seed(5)
        mine, _ = initial_contexts(model, ids, rows, settings, RankView(r, 3))
        assert mine.shape == (len(rows), 8) and torch.equal(mine, whole[rows.start:rows.stop])


class Killed(Exception):
    pass


@pytest.mark.parametrize("disk", [False, True])
def test_a_killed_rollout_resumes_from_its_last_save_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                disk: bool) -> None:
    """A memory store is saved by appending its rows; a disk store is the saved file itself."""
    monkeypatch.setattr(frozen_solve, "BLOCK", 100)
    model, ids = real_model(2, "gradual-reduction", 2.0, n=1000)
    where = batch_rows(1000, 64, lambda size: contiguous_shard(size, 1, 2))
    files = Files(tmp_path)
    with torch.no_grad():
        whole = frozen_solve.solve_frozen(model, ids, "sequential", 1e-5).layers[-1]
        want = torch.cat([whole[a:b] for a, b in where.spans])

        def attempt(kill_at: int | None) -> tuple[Any, torch.Tensor, int]:
            if disk:
                plan = StorePlan("disk", "fp32", 0, "")
                store = allocate(plan, where.rows, whole.shape[1], CPURunner(), files.file("solve-train.rows"),
                                 reuse=True)
            else:
                store = torch.full((where.rows, whole.shape[1]), float("nan"))
            saved = StoreCheckpoint(files, "train", store, where, CPURunner(), every_s=0, say=print, in_place=disk)
            done = saved.completed()
            if done is not None:
                return done, store, 0
            start = saved.resumed()[0]
            reached = saved.reached

            def report(position: int, context: torch.Tensor, out: torch.Tensor) -> None:
                if position == kill_at:
                    raise Killed
                reached(position, context, out)

            saved.reached = report  # type: ignore[method-assign]
            result = frozen_solve.solve_frozen(model, ids, "sequential", 1e-5, store, where, saved)
            saved.finish(result)
            return result, store, start

        with pytest.raises(Killed):
            attempt(kill_at=500)
        if not disk:
            with open(files.file("solve-train.rows"), "ab") as handle:  # killed after appending, before the record
                handle.write(b"\0" * 64)
        _, store, start = attempt(kill_at=None)
        assert start == 400  # the last save before the kill: only the work after it is done again
        assert torch.equal(store, want)
        again, store, _ = attempt(kill_at=0)  # finished: read back, never solved again
        assert torch.equal(store, want) and again.method == "sequential" and again.extra["resumed"]
    assert files.file("solve-train.rows").stat().st_size == want.numel() * 4  # the rows once, nothing twice


def test_the_validation_trials_continue_after_the_last_saved_one(tmp_path: Path) -> None:
    model, ids = real_model(2, "gradual-reduction", 2.0, n=300)

    class Stop:
        def __init__(self, at: int | None) -> None:
            self.at, self.trials = at, []

        def start(self, phase: str, total: int) -> None: ...

        def finish(self, phase: str) -> None: ...

        def message(self, text: str) -> None: ...

        def advance(self, phase: str, **fields: Any) -> None:
            self.trials.append(fields["trial"])
            if fields["trial"] == self.at:
                raise Killed

    with torch.no_grad():
        want = convergence_check(model, ids, 5)
        saved = TrialsCheckpoint(Files(tmp_path), 300, model.context_dim, 5, CPURunner(), every_s=0)
        with pytest.raises(Killed):
            convergence_check(model, ids, 5, Stop(at=3), saved)
        progress = Stop(at=None)
        got = convergence_check(model, ids, 5, progress,
                                TrialsCheckpoint(Files(tmp_path), 300, model.context_dim, 5, CPURunner(), 0))
    assert got == want
    assert sorted(tmp_path.glob("trials-*.rows")) == [tmp_path / "trials-4.rows"]


def test_phase1_contexts_are_one_file_per_rank_and_another_world_size_is_refused(tmp_path: Path) -> None:
    n, width, world = 500, 4, 3
    whole = torch.randn(n, width)
    shared = board(world)
    maps = [batch_rows(n, 50, lambda size, r=r: contiguous_shard(size, r, world)) for r in range(world)]
    stores: list[Any] = [None] * world
    answers: list[Any] = [None] * world

    def rank(r: int) -> None:
        runner = ThreadRank(r, world, shared)
        rows = contiguous_shard(n, r, world)
        Files(tmp_path).write_stream(phase1_contexts.file_name(runner),
                                     lambda handle: phase1_contexts.write(handle, whole[rows.start:rows.stop],
                                                                          rows.start))
        runner.barrier()
        answers[r] = phase1_contexts.readable(tmp_path, n, width, runner)
        stores[r] = torch.empty(maps[r].rows, width)
        phase1_contexts.read_into(tmp_path, stores[r], maps[r], runner)

    run_ranks(world, rank)
    assert answers == [True] * world
    for r in range(world):
        assert torch.equal(stores[r], torch.cat([whole[a:b] for a, b in maps[r].spans]))
    (tmp_path / "phase1-contexts.rank2-of-3.safetensors").unlink()
    for r in range(2):
        (tmp_path / f"phase1-contexts.rank{r}-of-3.safetensors").rename(
            tmp_path / f"phase1-contexts.rank{r}-of-2.safetensors")
    with pytest.raises(UserError, match=r"saved by a 2-process job; resume with 2 processes"):
        phase1_contexts.readable(tmp_path, n, width, ThreadRank(0, 1, board(1)))


