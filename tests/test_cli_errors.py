"""A CLI that never shows a traceback: every mistake a user can make is one `error:` line.

Markup in user text, Ctrl-C and SIGTERM, click's usage errors, OS errors, unreadable experiment
files. Only a bug keeps its traceback, after a line asking for a report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_fake_dist
from test_cli import ROOT, cli
from test_experiment import write_tiny

from newllm_kit.cli_errors import STOP_SIGNALS, stop_on_signal

Install = Callable[[str], dict[str, str]]  # plugin source -> environment for the CLI
MARKUP = ("[/x]", "[bold red]X")  # a closing tag that matches nothing, and a tag that would colour


def error_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The run's single `error:` line, after checking the exit code and that no traceback shows."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def with_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Install:
    """Installs a plugin whose module is the given source; returns the environment the CLI finds it in."""
    def install(source: str) -> dict[str, str]:
        make_fake_dist(tmp_path, monkeypatch, "case-dist", "1.0", {"case": "newllm_cli_case"},
                       {"newllm_cli_case.py": source})
        return {"PYTHONPATH": str(tmp_path)}

    return install


COMMANDS = """
import errno, os, signal, time
from newllm_kit import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command("stop-me")
    def stop_me() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    @cli.command("os-error")
    def os_error(code: str) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "some/file.bin")

    @cli.command("bug")
    def bug() -> None:
        raise RuntimeError("a bug")
"""


# -- A, G: user text is never rich markup ---------------------------------------------------------
def test_scaling_prints_markup_like_model_names_literally(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("model,tokens,val_ppl\n" + "".join(f"{m},{t},{p}\n" for m in MARKUP
                                                           for t, p in ((100, 50), (200, 40))))
    result = cli("scaling", str(table))
    assert result.returncode == 0, result.stderr
    for name in MARKUP:
        assert name in result.stdout, name
    assert "Steepest α: [/x]" in result.stdout


@pytest.mark.slow
def test_validate_prints_a_markup_like_file_name_literally(tmp_path: Path) -> None:
    file = tmp_path / "[red]v2.toml"
    file.write_text((ROOT / "experiments" / "quickstart.toml").read_text())  # one that validates offline
    result = cli("validate", str(file))
    assert result.returncode == 0, result.stderr
    assert "[red]v2.toml" in result.stdout


def test_plugins_table_escapes_a_broken_plugins_error(with_plugin: Install) -> None:
    env = with_plugin("raise ImportError('needs [/x] and [bold red]X')\n")
    result = cli("plugins", env=env)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert "[/x]" in flat and "[bold red]X" in flat


# -- B: signals ------------------------------------------------------------------------------------
# test_experiment's tiny config, made to run for minutes: long enough to be stopped mid-unit
LONG_RUN = {"data.docs": "2000", "data.val": "{start = 1500, count = 50}", "experiment.samples": "[600, 1200]",
            "solver.min_iterations": "20", "solver.max_iterations": "40", "phase2.epochs": "50",
            "phase2.patience": "50"}


def _default_sigint() -> None:
    """In the child before it starts: a shell's background job inherits SIGINT ignored, and Python then
    installs no Ctrl-C handler; the test is of the kit, not of the disposition pytest was started with."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT],
                         ids=["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_stops_a_run_with_the_promised_message(tmp_path: Path, sig: signal.Signals) -> None:
    config = write_tiny(tmp_path)
    out = tmp_path / "runs"
    overrides = [arg for key, value in LONG_RUN.items() for arg in ("--set", f"{key}={value}")]
    process = subprocess.Popen([sys.executable, "-m", "newllm_kit", "run", str(config), *overrides, "--out", str(out),
                                "--progress", "plain"], cwd=ROOT, env={**os.environ, "NO_COLOR": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("tiny/*/meta.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(1.0)  # inside the first unit's work
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    run_dir = next(out.glob("tiny/*/meta.json")).parent
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"interrupted ({sig.name})" in lines[0] and str(run_dir) in lines[0], stderr
    assert json.loads((run_dir / "meta.json").read_text())["status"] != "running"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT], ids=["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_stop_signal_is_a_named_interrupt_and_a_second_one_kills(sig: signal.Signals) -> None:
    assert sig in STOP_SIGNALS
    previous = signal.signal(sig, stop_on_signal)
    try:
        with pytest.raises(KeyboardInterrupt, match=sig.name):
            stop_on_signal(sig, None)
        assert signal.getsignal(sig) == signal.SIG_DFL
    finally:
        signal.signal(sig, previous)


def test_sigterm_outside_a_run_is_one_line(with_plugin: Install) -> None:
    result = cli("stop-me", env=with_plugin(COMMANDS))
    assert error_line(result, 130) == "error: interrupted (SIGTERM)"


# -- C: click's usage errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "experiments/v2.toml", "--outt", "x"], "error: no such option --outt (did you mean --out or --unit?)"),
        (["--bogus"], "error: no such option --bogus; see `newllm-kit --help`"),
        (["run"], "error: missing argument 'FILE'; see `newllm-kit run --help`"),
        (["scaling", "--predict", "abc"], "error: invalid value for '--predict'"),
        (["scalng"], "error: no such command scalng (did you mean scaling?)"),
        (["frobnicate"], "error: no such command frobnicate; the commands are validate, params, run"),
    ],
)
@pytest.mark.slow
def test_usage_errors_are_one_line_without_a_usage_box(args: list[str], expected: str) -> None:
    result = cli(*args)
    assert error_line(result).startswith(expected)
    assert "Usage:" not in result.stderr


@pytest.mark.slow
def test_help_and_no_arguments_still_show_help() -> None:
    for args in (["--help"], ["run", "--help"], []):
        result = cli(*args)
        assert "Usage:" in result.stdout + result.stderr and "run" in result.stdout + result.stderr, args
        assert "error:" not in result.stderr
    assert cli("--help").returncode == 0 and cli().returncode == 2


# -- D: OS errors a user can cause; bugs keep their traceback ---------------------------------------
@pytest.mark.parametrize(
    ("code", "needle"),
    [("EACCES", "check its permissions"), ("ENOSPC", "free some disk space"), ("EISDIR", "not a folder")],
)
def test_os_errors_name_the_file_and_what_to_do(with_plugin: Install, code: str, needle: str) -> None:
    line = error_line(cli("os-error", code, env=with_plugin(COMMANDS)))
    assert line.startswith("error: some/file.bin: ") and needle in line


def test_a_bug_asks_for_a_report_and_keeps_the_traceback(with_plugin: Install) -> None:
    result = cli("bug", env=with_plugin(COMMANDS))
    assert result.returncode == 1
    assert "error: internal error in newllm-kit" in result.stderr and "please report" in result.stderr
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
    assert result.stderr.index("internal error") < result.stderr.index("Traceback")


# -- E: experiment files that are not text files ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "params"])
def test_a_folder_or_binary_file_as_experiment_file_is_one_line(tmp_path: Path, command: str) -> None:
    assert str(tmp_path) in error_line(cli(command, str(tmp_path)))
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\xff\xfe\x00\x81 = 1\n")
    assert "x.toml" in error_line(cli(command, str(binary)))
    assert "nope.toml" in error_line(cli(command, str(tmp_path / "nope.toml")))


# -- F: scaling sources -----------------------------------------------------------------------------
@pytest.mark.slow
def test_scaling_counts_repeated_rows_once_and_says_so(tmp_path: Path) -> None:
    rows = "model,tokens,val_ppl\nA,1000,90\nA,2000,70\nA,4000,55\n"
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text(rows)
    second.write_text(rows)
    result = cli("scaling", str(first), str(second), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fits"][0]["points"] == 3
    assert any("b.csv" in w and "a.csv" in w and "counted once" in w for w in report["warnings"])


def test_scaling_damaged_results_jsonl_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"model": "A", "train_tokens": 10, "val_ppl": 3}\n' + "[" * 100_000)
    assert "results.jsonl:2: " in error_line(cli("scaling", str(tmp_path)))


@pytest.mark.slow
def test_scaling_plot_to_a_folder_is_one_line(tmp_path: Path) -> None:
    line = error_line(cli("scaling", "tests/data/seed_tables.csv", "--plot", str(tmp_path)))
    assert line.startswith(f"error: --plot: {tmp_path} is a folder")
