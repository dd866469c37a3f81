"""One rank of test_ddp_oom.py's two-process check, run as a script (torchrun's variables in the
environment): Phase 1 on a tiny block, optionally with one injected out-of-memory error."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from newllm_kit_plugins.cvfp.contract import Phase1Report
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from newllm_kit_plugins.cvfp.row_map import RowMap, gather
from newllm_kit_plugins.runners.ddp import DDPRunner
from newllm_kit_plugins.runners.local import RunnerSettings
from torch import nn


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
        failing = self.fail_on_rank is not None and self.fail_on_rank == int(os.environ["RANK"])
        if failing and torch.is_grad_enabled() and not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("injected: out of memory")
        return [self.norm(self.linear(context) + projected)]


class Model(nn.Module):
    """Token i of the table is the input of id i."""

    def __init__(self, block: Block, table: torch.Tensor) -> None:
        super().__init__()
        self.context_block, self.context_dim, self.table = block, 4, table

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": list(self.context_block.parameters()), "phase2": []}


class Quiet:
    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None: ...


def fit(runner: Any, fail_on_rank: int | None) -> Phase1Report:
    """Phase 1 of the tiny model on a 64-token stream (noise on: every sharding must draw the same)."""
    torch.manual_seed(0)
    model = Model(Block(fail_on_rank), torch.randn(64, 4))
    settings = CVFPPhase1Settings(batch_size=16, min_iterations=3, max_iterations=3)
    return CVFPPhase1Solver(settings).fit(model, torch.arange(64), runner, Quiet())


def main(rank: int, fail_on_rank: int | None, out: str) -> None:
    """Phase 1 on this rank (the torchrun variables come from the environment); writes rank<r>.json."""
    torch.set_num_threads(1)
    threads_before = _threads()
    runner = DDPRunner(RunnerSettings(auto_batch=True, timeout_s=30))
    runner.setup()
    try:
        report = fit(runner, fail_on_rank)
        n = report.tokens  # each rank holds its shard: the whole stream is gathered row by row
        rows = report.rows if report.rows is not None else range(n)
        whole = gather(report.contexts, RowMap.of(n, rows), torch.arange(n), runner)
        result = {"contexts": whole.tolist(), "oom_events": runner.describe()["oom_events"]}
        runner.barrier()  # neither rank tears the group down while the other still talks to it
    finally:
        runner.teardown()
    result["extra_threads_after_teardown"] = _threads() - threads_before  # gloo's workers joined, or not
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


if __name__ == "__main__":
    main(int(os.environ["RANK"]), None if sys.argv[1] == "none" else int(sys.argv[1]), sys.argv[2])
