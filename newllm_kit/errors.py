"""Errors a user can cause, and the exit codes the CLI maps them to.

Everything a user can fix (bad TOML, missing data, a broken plugin named in a config) is a
`UserError`: the CLI prints its one-line message and exits 2. A run that starts but cannot
produce a trustworthy number (a non-finite loss) is a `RunFailed`: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """An experiment file or `--set` override is invalid."""


class PluginError(UserError):
    """A plugin failed to load, registered a duplicate name, or cannot be found."""


class DataError(UserError):
    """Data is missing, empty, too small or malformed."""


class RunFailed(Exception):
    """The experiment ran but produced an unusable result (e.g. non-finite loss): exit code 1."""

    exit_code = 1


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; finished units are kept. Carries the run directory to resume."""

    exit_code = 130

    def __init__(self, run_dir: str, signal_name: str = "SIGINT", unit: str | None = None) -> None:
        again = f"newllm-kit run {run_dir}" + (f" --unit {unit}" if unit else "")
        super().__init__(f"interrupted ({signal_name}); finished units are kept, continue with `{again}`")
        self.run_dir = run_dir
        self.signal_name = signal_name
