"""Out-of-memory on one ddp rank: every rank shrinks its micro-batch and redoes the sweep together.

Two gloo processes run Phase 1 on a tiny block; rank 1 raises an out-of-memory error in its first
training sweep. A rank that retried on its own would re-enter the sweep's all-reduces out of step
with rank 0 (mismatched tensors, or a hang until the timeout); with the agreement both finish,
both record one OOM event, and the contexts match a run without the error.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from newllm_kit_plugins.ddp_runner import DDPRunner
from newllm_kit_plugins.fixed_point import CVFPSolver, CVFPSolverSettings
from newllm_kit_plugins.local_runner import RunnerSettings
from torch import nn

WORLD = 2


class Block(nn.Module):
    """F(c, x) = LayerNorm(W c + x): contracting, with parameters for Phase 1 to train."""

    def __init__(self, fail_on_rank: int | None) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            self.linear.weight.mul_(0.3)
        self.fail_on_rank, self.failed = fail_on_rank, False

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        rank = int(os.environ["RANK"])
        if self.fail_on_rank == rank and torch.is_grad_enabled() and not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("injected: out of memory")
        return [self.norm(self.linear(context) + projected)]


class Model(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.context_block, self.context_dim = block, 4

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": list(self.context_block.parameters()), "phase2": []}


class Quiet:
    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...


def _worker(rank: int, port: int, fail_on_rank: int | None, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    runner = DDPRunner(RunnerSettings(auto_batch=True, timeout_s=30))
    runner.setup()
    try:
        torch.manual_seed(0)
        model, tokens = Model(Block(fail_on_rank)), torch.randn(64, 4)
        settings = CVFPSolverSettings(batch_size=16, min_iterations=3, max_iterations=3)
        report = CVFPSolver(settings).fit(model, tokens, runner, Quiet())
        result = {"contexts": report.contexts.tolist(), "oom_events": runner.describe()["oom_events"]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        runner.teardown()


def _run(tmp_path: Path, fail_on_rank: int | None) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = tmp_path / str(fail_on_rank)
    out.mkdir()
    mp.start_processes(_worker, args=(port, fail_on_rank, str(out)), nprocs=WORLD, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_an_oom_on_one_rank_is_retried_by_every_rank_in_step(tmp_path: Path) -> None:
    clean = _run(tmp_path, None)
    failed = _run(tmp_path, 1)
    assert [len(r["oom_events"]) for r in clean] == [0, 0]
    assert [len(r["oom_events"]) for r in failed] == [1, 1]  # rank 0 shrank its micro-batch too
    assert [e["new_micro"] for r in failed for e in r["oom_events"]] == [8, 8]
    for r in failed:
        torch.testing.assert_close(torch.tensor(r["contexts"]), torch.tensor(clean[0]["contexts"]),
                                   atol=1e-5, rtol=1e-5)
