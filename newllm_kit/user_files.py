"""Reading a file a user names on the command line, with a bound that holds whatever the file is.

`stat` cannot be trusted for the size: `/dev/zero` says 0 bytes and never ends, a FIFO says 0
and waits for a writer forever. So a file is opened without blocking, must be a regular file
(checked on the open handle, not on the name, so nothing can be swapped in between), and is read
to at most its limit plus one byte.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def mebibytes(limit: int) -> str:
    return f"{limit / 2**20:g} MiB"


def read_bounded(path: Path, limit: int, what: str, error: type[UserError] = UserError) -> bytes:
    """The bytes of the regular file `path`, or `error` in one line naming it and `what` it should be
    (a noun such as "experiment file"): a folder, FIFO, device or socket is refused before anything
    is read, and a file over `limit` bytes after reading `limit + 1`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"cannot read {what} {path}: it is {kind(mode)}; give a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as failure:
            raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    if len(data) > limit:
        raise error(f"cannot read {what} {path}: more than {limit:,} bytes; {what}s are limited to {mebibytes(limit)}")
    return data


def check_regular(path: Path, what: str, error: type[UserError] = UserError) -> None:
    """Refuse a path that exists but is a FIFO, device or socket, whose read would wait or never end;
    a missing file or a folder is left to the caller's own message."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"cannot read {what} {path}: it is {kind(mode)}; give a regular file")
