"""Out-of-memory on one ddp rank: every rank shrinks its micro-batch and redoes the sweep together.

Two gloo processes (tests/builtin/ddp_oom_worker.py) run Phase 1 on a tiny block; rank 1 raises an
out-of-memory error in its first training sweep. A rank that retried on its own would re-enter
the sweep's all-reduces out of step with rank 0 (mismatched tensors, or a hang until the
timeout); with the agreement both finish, both record one OOM event, and the contexts match a
run without the error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import ddp_oom_worker
import pytest
import torch
from newllm_kit_plugins.runners.local import CPURunner

WORKER = Path(__file__).with_name("ddp_oom_worker.py")
WORLD = 2


def _run(tmp_path: Path, fail_on_rank: int | None) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = tmp_path / str(fail_on_rank)
    out.mkdir()
    env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(fail_on_rank).lower(), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(WORLD)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), errors
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
def test_an_oom_on_one_rank_is_retried_by_every_rank_in_step(tmp_path: Path) -> None:
    clean = _run(tmp_path, None)
    failed = _run(tmp_path, 1)
    assert [len(r["oom_events"]) for r in clean] == [0, 0]
    assert [len(r["oom_events"]) for r in failed] == [1, 1]  # rank 0 shrank its micro-batch too
    assert [e["new_micro"] for r in failed for e in r["oom_events"]] == [8, 8]
    # teardown really ends the group: a group kept alive until interpreter shutdown lets a gloo worker
    # release tensors without the interpreter and abort the process after a successful run
    assert [r["extra_threads_after_teardown"] for r in clean + failed] == [0, 0, 0, 0]
    for r in failed:
        torch.testing.assert_close(torch.tensor(r["contexts"]), torch.tensor(clean[0]["contexts"]),
                                   atol=1e-5, rtol=1e-5)
    one_process = ddp_oom_worker.fit(CPURunner(), None).contexts  # same chunks, same noise, same steps
    torch.testing.assert_close(torch.tensor(clean[1]["contexts"]), one_process, atol=1e-5, rtol=1e-5)
