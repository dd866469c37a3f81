"""How an error reaches the user of the command line: one line on stderr and an exit code.

A user's mistake exits 2, a run whose numbers cannot be trusted 1, an interrupted one 130 (SIGTERM,
SIGHUP and SIGQUIT stop a run exactly as Ctrl-C does); only a bug shows a traceback, unless `--traceback` asks.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from types import FrameType

import typer

from . import __version__
from .errors import RunFailed, RunInterrupted, UserError


def did_you_mean(close: list[str]) -> str:
    return f" (did you mean {' or '.join(sorted(close))}?)" if close else ""


# What a user can do about an OSError that reaches the top; any other errno is a bug.
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "part of the path is a file, not a folder; check the path",
    errno.ENOSPC: "free some disk space or choose another place, then try again",
    errno.EDQUOT: "free some disk space or choose another place, then try again",
    errno.EROFS: "choose a writable place",
}


# Signals that stop a command as Ctrl-C does: SIGTERM (what Slurm and Kubernetes send before SIGKILL),
# SIGHUP (the terminal or ssh session closed) and SIGQUIT (Ctrl-\); their default would end the
# process without recording how the run stopped.
# SIGUSR2: what a cluster scheduler sends before it preempts a job or its time runs out (Slurm's --signal).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR2")
                     if hasattr(signal, name))


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop on one of `STOP_SIGNALS` exactly as on Ctrl-C, so a run records that it stopped. The
    signal's name is the KeyboardInterrupt's argument; a second one of the same kind kills at once."""
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _usage_message(error: typer.TyperException) -> str:
    """One line for a command-line mistake (click's usage errors), instead of a usage box."""
    ctx = getattr(error, "ctx", None)
    see = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    if hasattr(error, "possibilities"):  # no such option; click already picked the close matches
        close = list(getattr(error, "possibilities", None) or [])
        return f"no such option {getattr(error, 'option_name', '?')}" + (did_you_mean(close) or see)
    text = " ".join(error.format_message().split()).rstrip(".")
    return text[:1].lower() + text[1:] + see


def _explain(error: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message for an error a user can cause or fix; None for a bug."""
    if isinstance(error, UserError | RunFailed | RunInterrupted):
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):
        return 130, f"interrupted ({error.args[0] if error.args else 'SIGINT'})"
    if isinstance(error, typer.TyperException):
        return error.exit_code, _usage_message(error)
    if isinstance(error, OSError) and error.errno in _OS_HINTS:
        names = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return 2, f"{names + ': ' if names else ''}{error.strerror}; {_OS_HINTS[error.errno]}"
    return None


def exit_for(error: BaseException, show_traceback: bool) -> None:
    """Exit with the one line and the code `error` deserves; return only for a bug, which the caller
    re-raises so that its traceback is the report."""
    if isinstance(error, typer.Exit):  # --help, --version
        sys.exit(error.exit_code)
    if isinstance(error, BrokenPipeError):  # `newllm-kit plugins | head` stopped reading: not worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    if type(error).__name__ == "NoArgsIsHelpError":  # no arguments: the help is the answer
        if help_text := str(error):  # empty where rich has printed the help already
            print(help_text, file=sys.stderr)
        sys.exit(2)
    explained = _explain(error)
    if explained is None:
        print(f"error: internal error in newllm-kit {__version__}; please report it with the traceback "
              f"below", file=sys.stderr)
        return
    if show_traceback:
        traceback.print_exc()
    code, message = explained
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
