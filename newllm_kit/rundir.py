"""The run directory: atomic writes, per-unit checkpoints, one writer, and repair on resume.

Every file a reader may open is written to a temporary name in the same folder, fsynced and
renamed into place, so a run killed at any instant leaves either the old or the new version,
never half a file. Checkpoints are folders of data (safetensors and JSON, never pickle),
published by atomically rewriting a `LATEST` pointer. Every path written or deleted is checked
to lie inside the run directory, and a lock file keeps a second process out.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, suppress
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError
from .result_records import record_problem
from .strict_json import finite_json, json_text

LOCK = ".lock"
STORE_DIR = "store"  # a running unit's scratch folder (UnitContext.scratch): large temporary files
ORPHANS = "results.orphans.jsonl"  # records a resume found but cannot use: kept, never deleted
TRACKER_FILES = ("tensorboard", "mlflow.db", "mlflow-artifacts", "wandb")  # the built-in trackers' defaults
KIT_NAMES = ("config.resolved.toml", "overrides.txt", "meta.json", "results.jsonl", "results.csv", ORPHANS,
             "summary.json", "metrics.jsonl", LOCK, "plots", "checkpoints", STORE_DIR, "variants", "documents",
             "units", "jobs", "models", "evaluations", *TRACKER_FILES)
SHALLOW = ("wandb",)  # checked as a whole only: W&B itself links each run's service log to ~/.cache/wandb

# (stage, tensor groups by file name, JSON state) of one checkpoint
Checkpoint = tuple[str, dict[str, dict[str, torch.Tensor]], dict[str, Any]]


def _read_umask() -> int:
    """Reading the umask means setting it: set a strict one for that instant, then put it back."""
    old = os.umask(0o077)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp alone makes 0600 files


def plain_name(name: str) -> bool:
    """One path component, so a unit id or a LATEST pointer cannot lead out of its folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name, fsynced and renamed into place only when complete, so a
    reader sees the whole file or none, also when the data arrives in pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data, indent=2) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a pid beyond pid_t names none
        return False
    except PermissionError:  # someone else's process
        pass
    return True


class CheckpointUnreadable(Exception):
    """A checkpoint that is damaged or incomplete: the unit starts over."""


class RunDir:
    """One run of one experiment file: `runs/<experiment>/<timestamp>-<id>/`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: dict[str, Any] | None = None

    @classmethod
    def create(cls, root: Path, experiment: str) -> RunDir:
        if root.exists() and not root.is_dir():
            raise UserError(f"--out {root}: a file, not a folder; pass a folder for the run directories")
        path = root / experiment / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except OSError as error:
            raise UserError(f"--out {root}: cannot create the run directory {path} "
                            f"({error.strerror or error})") from error
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        config = path / "config.resolved.toml"
        if not config.is_file():
            raise UserError(f"{path}: not a run directory (no config.resolved.toml); pass the folder "
                            f"`newllm-kit run` printed, e.g. runs/<experiment>/<timestamp>-<id>")
        try:
            config.read_bytes()
        except OSError as error:
            raise UserError(f"{config}: cannot read ({error.strerror or error})") from error
        return cls(path)

    # -- paths and writes ---------------------------------------------------------------------
    def inside(self, path: Path) -> Path:
        """`path` resolved, if it lies inside the run directory; every write and delete goes through here."""
        root, resolved = self.path.resolve(), path.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise UserError(f"{path}: outside the run directory {self.path}; refusing to write or delete it")
        return resolved

    def check_links(self) -> None:
        """Refuse, before any work, a file or folder the kit reads or writes that is a symbolic link
        leading out of the run directory: a unit would train, and its results, plots or checkpoints
        then land elsewhere (or be read from elsewhere)."""
        for name in KIT_NAMES:
            top = self.path / name
            paths = [top]
            if top.is_dir() and not top.is_symlink() and name not in SHALLOW:
                for folder, dirs, files in os.walk(top):  # does not descend into linked folders
                    paths += [Path(folder) / entry for entry in (*dirs, *files)]
            for path in paths:
                if path.is_symlink() and not path.resolve().is_relative_to(self.path.resolve()):
                    raise UserError(f"{path}: a symbolic link to {path.resolve()}, outside the run directory; "
                                    f"newllm-kit writes only inside it: replace the link with a plain "
                                    f"{'folder' if path.is_dir() else 'file'} (or remove it) and run again")

    def _write_error(self, file: Path, error: OSError) -> UserError:
        """One line naming the file and how to go on: continue the run where it holds its configuration
        (it is resumable), else start it again, since nothing of it was kept."""
        fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        if (self.path / "config.resolved.toml").is_file():
            return UserError(f"{file}: cannot write ({error.strerror or error}); {fix} and continue with "
                             f"`newllm-kit run {self.path}`")
        return UserError(f"{file}: cannot write ({error.strerror or error}); {fix} and start the run again "
                         f"(nothing was kept in {self.path}, which may be deleted)")

    @contextmanager
    def _writing(self, file: Path) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise self._write_error(file, error) from error

    def write_text(self, name: str, text: str) -> None:
        file = self.inside(self.path / name)
        with self._writing(file):
            atomic_write_text(file, text)

    def write_stream(self, file: Path, write: Callable[[BinaryIO], None]) -> None:
        """`write(handle)` into `file` (inside the run) atomically: the whole file or none, in pieces."""
        file = self.inside(file)
        with self._writing(file), atomic_writer(file) as handle:
            write(handle)

    def append_stream(self, file: Path, write: Callable[[BinaryIO], None]) -> None:
        """`write(handle)` at the end of `file` (inside the run), fsynced before this returns: what a
        later atomic record then counts as written is on disk."""
        file = self.inside(file)
        with self._writing(file), open(file, "ab") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    def publish_folder(self, folder: Path, files: dict[str, bytes]) -> None:
        """Write `files` (name -> bytes) as `folder` inside the run, whole or not at all: each fsynced into
        a hidden sibling, which is then renamed over `folder` (an earlier one is replaced)."""
        folder = self.inside(folder)
        tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
        with self._writing(tmp):
            folder.parent.mkdir(parents=True, exist_ok=True)
            for leftover in (tmp, old):
                self._remove(leftover)
            tmp.mkdir()
            for name, data in files.items():
                _write_synced(tmp / name, data)
            _fsync_dir(tmp)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
            self._remove(old)

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json_text(data, indent=2) + "\n")

    def read_json(self, name: str) -> Any:
        """The file's JSON value, or None when it is missing or damaged (the caller rewrites it)."""
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _remove(self, path: Path) -> None:
        self.inside(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # -- one writer ---------------------------------------------------------------------------
    def lock(self, notify: Callable[[str], None]) -> None:
        """Make this process the run directory's only writer until `unlock`.

        The lock file is created exclusively and names its holder, so a second process is told who
        holds it; a holder that died on this host (kill -9) is found by its pid and replaced."""
        file = self.inside(self.path / LOCK)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        while True:
            try:
                fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over(file, notify)
                continue
            except OSError as error:
                raise self._write_error(file, error) from error
            with os.fdopen(fd, "w") as handle, self._writing(file):
                handle.write(json.dumps(mine))
                handle.flush()
                os.fsync(handle.fileno())
            self._lock = mine
            return

    def _take_over(self, file: Path, notify: Callable[[str], None]) -> None:
        """Remove the lock of a process that died on this host; refuse any other."""
        try:
            holder = json.loads(file.read_text(encoding="utf-8"))
            pid, host, since = int(holder["pid"]), str(holder["host"]), holder.get("started", "?")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, TypeError, KeyError):
            raise UserError(f"{self.path}: locked by another process ({file} is unreadable); if no newllm-kit "
                            f"run uses this folder, delete {file} and run again") from None
        if host != socket.gethostname():
            raise UserError(f"{self.path}: in use by pid {pid} on host {host} (since {since}); if that process "
                            f"is gone, delete {file} and run again")
        if pid > 0 and _alive(pid):
            raise UserError(f"{self.path}: in use by another newllm-kit process (pid {pid} on {host}, since "
                            f"{since}); wait for it to finish or stop it")
        notify(f"{self.path}: taking over the lock of pid {pid} (since {since}), which is no longer running")
        file.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Release the lock if this process still holds it."""
        if self._lock is None:
            return
        file = self.path / LOCK
        with suppress(OSError, ValueError):
            if json.loads(file.read_text(encoding="utf-8")) == self._lock:
                file.unlink()
        self._lock = None

    # -- records ------------------------------------------------------------------------------
    def finished_records(self, key: Callable[[dict[str, Any]], Hashable], planned: set[Any],
                         warn: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
        """The records of results.jsonl that count as finished units of the plan, and whether any were
        set aside. Nothing is deleted silently: a record of a unit not in `planned` (by `key`), a second
        record of one unit, or one whose fields the kit cannot read is moved to results.orphans.jsonl
        with a warning naming its line, and such a unit runs again. A cut last line (a killed writer) is
        skipped with a warning; a line elsewhere that is no JSON object is refused, to repair by hand."""
        file = self.path / "results.jsonl"
        try:
            lines = self.inside(file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return [], False
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{file}: cannot read ({error})") from error
        records, aside, seen = [], [], set()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if number != len(lines):
                    raise UserError(f"{file}:{number}: not a result record; repair or delete that line")
                warn(f"warning: {file}:{number}: skipping a cut-off last line (left by a killed run)")
                continue
            problem = record_problem(record)
            why = problem and f"unreadable record ({problem}); its unit runs again"
            if why is None:
                unit = key(record)
                why = ("a record of a unit not in this run's plan" if unit not in planned
                       else "a second record of one unit; the first is kept" if unit in seen else None)
                seen.add(unit)
            if why is None:
                records.append(record)
            else:
                warn(f"warning: {file}:{number}: {why}; moved to {ORPHANS}")
                aside.append(line.strip())
        self.set_aside(aside)
        return records, bool(aside)

    def set_aside(self, lines: list[str]) -> None:
        """Append `lines` to results.orphans.jsonl (once each: a resume killed before results.jsonl was
        rewritten finds them again)."""
        file = self.inside(self.path / ORPHANS)
        kept = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
        new = [line for line in dict.fromkeys(lines) if line not in set(kept)]
        if new:
            self.write_text(ORPHANS, "".join(f"{line}\n" for line in [*kept, *new]))

    def write_results(self, records: list[dict[str, Any]], columns: Sequence[str]) -> None:
        """Rewrite results.jsonl and results.csv whole (they are small) so neither is ever partial."""
        self.write_text("results.jsonl", "".join(json_text(r) + "\n" for r in records))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(finite_json(records))  # a missing number is an empty cell, never "nan"
        self.write_text("results.csv", buffer.getvalue())

    def log_metrics(self, record: dict[str, Any], file: Path | None = None) -> None:
        """Append one per-iteration/per-epoch line to metrics.jsonl (or a unit's own `file`); `repair` cuts
        a line a kill left unfinished."""
        file = self.inside(file or self.path / "metrics.jsonl")
        with self._writing(file), open(file, "a", encoding="utf-8") as handle:
            handle.write(json_text(record) + "\n")

    def repair(self, finished: set[str], busy: set[str] | None = None) -> None:
        """Finish what a killed process left half done (records are rewritten by the caller): remove
        temporaries, the scratch files (disk context stores) of units no live process holds (`busy`),
        the checkpoints of finished units and an empty checkpoints/, and cut an unfinished last metrics
        line so the next append starts on a line of its own."""
        busy = busy or set()
        for stray in [*self.path.glob(".*.tmp"), *self.path.glob("documents/.*.tmp")]:
            self._remove(stray)
        for stray in self.path.glob("checkpoints/*/.*.tmp"):
            if stray.parent.name not in busy:
                self._remove(stray)
        scratch = self.path / STORE_DIR
        if not busy:
            self._remove(scratch)
        elif scratch.is_dir() and not scratch.is_symlink():
            for entry in scratch.iterdir():
                if entry.name not in busy:
                    self._remove(entry)
        for unit_dir in self.path.glob("checkpoints/*"):
            if unit_dir.name in finished:
                self._remove(unit_dir)
        with suppress(OSError):
            (self.path / "checkpoints").rmdir()  # only when empty
        for metrics in [self.path / "metrics.jsonl",
                        *(p for p in self.path.glob("units/*/metrics.jsonl") if p.parent.name not in busy)]:
            self._cut_unfinished_line(metrics)

    def repair_unit(self, unit: str) -> None:
        """What a killed run of one unit left: its scratch files, its checkpoint's temporaries and an
        unfinished last line of its metrics (the unit's claim is this process's, so nothing else uses them)."""
        self._remove(self.path / STORE_DIR / unit)
        for stray in self.path.glob(f"checkpoints/{glob_escape(unit)}/.*.tmp"):
            self._remove(stray)
        self._cut_unfinished_line(self.path / "units" / unit / "metrics.jsonl")

    def _cut_unfinished_line(self, file: Path) -> None:
        metrics = self.inside(file)
        if metrics.is_file():
            with self._writing(metrics), open(metrics, "rb+") as handle:
                data = handle.read()
                if data and not data.endswith(b"\n"):
                    handle.truncate(data.rfind(b"\n") + 1)

    # -- checkpoints --------------------------------------------------------------------------
    def unit_folder(self, parent: str, unit: str) -> Path:
        """`parent/<unit>` inside the run directory, for a unit id that is one plain path component."""
        if not plain_name(unit):
            raise UserError(f"unit {unit!r}: not usable as a folder name (no '/', '\\', '..'); rename the model")
        return self.inside(self.path / parent / unit)

    def checkpoint_dir(self, unit: str) -> Path:
        return self.unit_folder("checkpoints", unit)

    def save_checkpoint(self, unit: str, stage: str, tensors: dict[str, dict[str, torch.Tensor]],
                        state: dict[str, Any]) -> None:
        """Write a complete, fsynced folder (`<group>.safetensors` per tensor group, state.json), then
        publish it by rewriting LATEST atomically. A kill mid-write leaves at most an unpublished folder,
        which LATEST never names and the next save (or `repair`) removes."""
        unit_dir = self.checkpoint_dir(unit)
        final = unit_dir / f"{stage}-{secrets.token_hex(3)}"
        tmp = unit_dir / f".{final.name}.tmp"
        with self._writing(tmp):
            unit_dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            for group, values in tensors.items():
                _write_synced(tmp / f"{group}.safetensors",
                              save({k: v.detach().contiguous().cpu() for k, v in values.items()}))
            _write_synced(tmp / "state.json", json.dumps(state).encode())
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(unit_dir)
            _fsync_dir(unit_dir.parent)
            atomic_write_text(unit_dir / "LATEST", final.name)
        for stale in unit_dir.iterdir():  # the previous checkpoint, and leftovers of a killed writer
            if stale.is_dir() and stale != final:
                self._remove(stale)

    def load_checkpoint(self, unit: str, device: torch.device | str = "cpu") -> Checkpoint | None:
        """The unit's published checkpoint, tensors on `device`; None when there is none.

        Raises CheckpointUnreadable when it is damaged, and UserError for an older kit's pickle
        checkpoint, which is never loaded: unpickling can run any code."""
        unit_dir = self.checkpoint_dir(unit)
        pointer = unit_dir / "LATEST"
        if not pointer.exists():
            return None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointUnreadable(f"{pointer}: {error}") from error
        folder = unit_dir / name
        if not plain_name(name) or folder.is_symlink() or not folder.is_dir():
            raise CheckpointUnreadable(f"{pointer} names {name!r}, not a checkpoint folder")
        if pointer.is_symlink() or any(file.is_symlink() for file in folder.iterdir()):  # data from elsewhere
            raise CheckpointUnreadable(f"{folder}: a symbolic link where the kit writes plain files")
        if (folder / "state.pt").exists() and not (folder / "state.json").exists():
            raise UserError(f"{folder}: checkpoint written by an older newllm-kit (pickle state.pt, no longer "
                            f"loaded for safety); delete {unit_dir} to restart that unit, finished units are kept")
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            groups = {file.stem: load_file(file, device=str(device)) for file in folder.glob("*.safetensors")}
        except (OSError, ValueError, SafetensorError) as error:
            raise CheckpointUnreadable(f"{folder}: {error}") from error
        if not isinstance(state, dict):
            raise CheckpointUnreadable(f"{folder / 'state.json'}: not a JSON object")
        return name.rsplit("-", 1)[0], groups, state

    def drop_checkpoint(self, unit: str) -> None:
        self._remove(self.checkpoint_dir(unit))
