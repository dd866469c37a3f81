"""Claims: which process works on a unit of a shared run directory, and who rebuilds its tables.

Jobs on several hosts share one run directory over a network filesystem, so a claim is a file
created with `O_CREAT | O_EXCL` (atomic on NFS too, unlike `flock`) that names its holder: host,
pid, job id, when it started and a heartbeat the holder rewrites every few seconds. A claim is
taken over, with a warning, when its holder is gone: a pid no longer running on this host, the
same job requeued (a Slurm job keeps its id), or a heartbeat older than `stale_after_s` (another
host's process, whose pid we cannot check). Takeovers go through a short claim of their own, so
two processes cannot both replace one stale claim.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import UserError
from .rundir import atomic_write_json

STALE_AFTER_S = 600.0  # default: a heartbeat older than this means its holder is gone
SHORT_STALE_S = 120.0  # a short claim (tables, meta.json) is held for well under a second
UNWRITTEN_S = 30.0  # a claim file still empty or unreadable this long was left by a process that died


def job_id(env: dict[str, str] | None = None) -> str:
    """The scheduler's id of this process's job (`123_4` for an array task), or "" outside one."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or ""


def me() -> dict[str, Any]:
    """What a claim says about its holder."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "token": secrets.token_hex(8),
            "started": now, "heartbeat": now, "phase": ""}


def read_claim(file: Path) -> dict[str, Any] | None:
    """The claim's holder, or None when the file is gone, still being written or damaged."""
    try:
        holder = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_gone(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # someone else's process: alive
        return False
    return False


def gone_because(holder: dict[str, Any] | None, age_s: float, stale_after_s: float) -> str | None:
    """Why the holder of a claim is gone, or None while it may still be working."""
    if holder is None:  # a claim is written right after its exclusive create: one still empty is left over
        limit = min(stale_after_s, UNWRITTEN_S)
        return f"its claim file is unreadable and {age_s:.0f} s old" if age_s > limit else None
    here = holder.get("host") == socket.gethostname()
    if here and holder.get("pid") == os.getpid():
        return "it was this process's own claim"
    if here and _pid_gone(holder.get("pid")):
        return f"pid {holder.get('pid')} is no longer running on {holder.get('host')}"
    mine = job_id()
    if mine and holder.get("job") == mine:
        return f"job {mine} was requeued and runs again here"
    beat = holder.get("heartbeat")
    silent = time.time() - beat if isinstance(beat, int | float) else age_s
    if silent > stale_after_s:
        return f"its heartbeat is {silent:.0f} s old, stale after {stale_after_s:.0f} s"
    return None


def inspect(file: Path, stale_after_s: float) -> tuple[dict[str, Any] | None, str | None] | None:
    """A unit's claim as others see it: (holder, why it is gone or None while it may still work), or
    None when the unit has no claim."""
    try:
        age = time.time() - file.stat().st_mtime
    except OSError:
        return None
    holder = read_claim(file)
    return holder, gone_because(holder, age, stale_after_s)


def describe(holder: dict[str, Any]) -> str:
    """`host h, pid p, job j` for messages and `status`."""
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}"


def _create(file: Path, holder: dict[str, Any]) -> bool:
    """Create `file` holding `holder` if no one has: the one atomic step every claim rests on."""
    try:
        fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(holder))
        handle.flush()
        os.fsync(handle.fileno())
    return True


@contextmanager
def short_claim(file: Path, wait_s: float = 300.0) -> Iterator[None]:
    """Hold `file` for a moment (rebuilding tables, updating meta.json): wait while another process
    holds it, take it over when its holder is gone."""
    mine = me()
    deadline = time.monotonic() + wait_s
    while not _create(file, mine):
        state = inspect(file, SHORT_STALE_S)
        if state is None:  # released meanwhile
            continue
        holder, gone = state
        if gone is not None:
            if read_claim(file) == holder:
                with suppress(FileNotFoundError):
                    file.unlink()
            continue
        if time.monotonic() > deadline:
            raise UserError(f"{file}: held by {describe(holder or {})} for over {wait_s:.0f} s; if no newllm-kit "
                            f"process uses this run directory, delete {file} and run again")
        time.sleep(0.02 + 0.08 * secrets.randbelow(100) / 100)
    try:
        yield
    finally:
        if read_claim(file) == mine:
            with suppress(FileNotFoundError):
                file.unlink()


class Claimed(Exception):
    """A live holder has the unit."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__(describe(holder))
        self.holder = holder


class UnitClaim:
    """This process's claim on one unit, kept alive by a heartbeat thread until `release`."""

    def __init__(self, file: Path, holder: dict[str, Any], heartbeat_s: float) -> None:
        self.file, self.holder, self.heartbeat_s = file, holder, heartbeat_s
        self.lost: dict[str, Any] | None = None  # who took the claim over, if anyone did
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat_until_released, name=f"claim {file.parent.name}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, file: Path, stale_after_s: float, warn: Callable[[str], None]) -> UnitClaim:
        """Claim the unit of `file`; raises Claimed when a live holder has it."""
        mine = me()
        while not _create(file, mine):
            state = inspect(file, stale_after_s)
            if state is None:  # released meanwhile
                continue
            holder, why = state
            if why is None:
                if holder is None:  # created this instant, not yet written: look again
                    time.sleep(0.05)
                    continue
                raise Claimed(holder)
            with short_claim(file.with_name(f".{file.name}.takeover")):
                if read_claim(file) == holder:  # nobody took it over meanwhile
                    with suppress(FileNotFoundError):
                        file.unlink()
                    if holder is not None and "own claim" not in why and "requeued" not in why:
                        warn(f"warning: {file.parent.name}: taking over the claim of {describe(holder)} ({why})")
        return cls(file, mine, max(0.2, min(30.0, stale_after_s / 10)))

    def beat(self, phase: str | None = None) -> None:
        """Rewrite the claim with a fresh heartbeat (and the running phase); notes a takeover instead."""
        with self._lock:
            if self.lost is not None or self._stop.is_set():
                return
            current = read_claim(self.file)
            if current is None or current.get("token") != self.holder["token"]:
                self.lost = current or {}
                return
            if phase is not None:
                self.holder["phase"] = phase
            self.holder["heartbeat"] = time.time()
            with suppress(OSError):  # a full disk or a network hiccup: the next beat tries again
                atomic_write_json(self.file, self.holder)

    def _beat_until_released(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def release(self) -> None:
        """Stop the heartbeat and remove the claim, if it is still this process's."""
        with self._lock:
            self._stop.set()
            current = read_claim(self.file)
            if current is not None and current.get("token") == self.holder["token"]:
                with suppress(FileNotFoundError):
                    self.file.unlink()
        self._thread.join(timeout=5)
