"""Freed chunk-sized CPU tensors must not stay in the process (glibc's heap fragments otherwise)."""

import os
import subprocess
import sys
import textwrap

import pytest

from newllm_kit.allocator import return_large_blocks_to_os

PROBE = textwrap.dedent("""
    import sys, torch
    from newllm_kit.allocator import return_large_blocks_to_os
    applied = return_large_blocks_to_os() if sys.argv[1] == "on" else False
    def rss_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
    block = torch.ones(4 << 20)
    del block  # a freed 16 MiB block: glibc's dynamic threshold rises to it
    base, kept = rss_mb(), []
    for _ in range(20):  # the Phase-1 pattern: a chunk's activation, a small tensor that outlives it
        chunk = torch.ones(2 << 20)
        kept.append(torch.ones(16))
        del chunk
    print(applied, rss_mb() - base)
""")


def probe(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    applied, growth = out.stdout.split()
    return applied == "True", int(growth)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_freed_chunks_leave_the_process() -> None:
    applied, growth = probe("on")
    if not applied:
        pytest.skip("not glibc: the allocator setting does not apply")
    assert growth < 40  # 20 freed 8 MiB chunks: with glibc's default threshold they stay (~150 MB)


def test_a_threshold_the_user_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_large_blocks_to_os() is False


def test_system_keeps_glibcs_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWLLM_KIT_MALLOC", "system")
    assert return_large_blocks_to_os() is False
