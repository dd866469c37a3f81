"""The command line as a user meets it: exit codes, one-line errors, --json purity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "newllm_kit", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=120)


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("newllm-kit ")


@pytest.mark.slow
def test_every_command_has_an_example_in_its_help() -> None:
    for command in ("run", "scaling", "params", "validate", "plugins"):
        result = cli(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Example" in result.stdout, command


def test_plugins_json_is_one_document_listing_builtins() -> None:
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["cvfp"]["components"] == {"architecture": ["cvfp"]}
    assert by_name["cvfp"]["distribution"] == "newllm-kit"


@pytest.mark.slow
def test_plugins_table_for_humans() -> None:
    result = cli("plugins")
    assert result.returncode == 0
    assert "cvfp" in result.stdout and "{" not in result.stdout


@pytest.mark.slow
def test_params_json_gives_the_v2_counts_exactly() -> None:
    result = cli("params", "experiments/v2.toml", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["label"]: r for r in json.loads(result.stdout)["models"]}
    assert rows["A"]["context_block"] == 15_394_304 and rows["A"]["token_block"] == 8_566_272
    assert rows["A"]["total"] == 62_559_488
    assert rows["B"]["context_block"] == 20_730_880 and rows["B"]["token_block"] == 5_905_152
    assert rows["B"]["total"] == 65_234_944
    assert rows["A"]["trainable"] == {"phase1": 15_394_304, "phase2": 8_566_272}
    assert set(rows["A"]) == {"label", "context_block", "token_block", "embedding", "head", "total", "trainable"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "experiments/v2.toml", "--set", "models.0.layerz=4"], "did you mean 'layers'"),
        (["validate", "experiments/v2.toml", "--set", "solver.learning_rate=nan"], "non-finite"),
        (["validate", "experiments/v2.toml", "--set", "solver.name=cvpf"], "did you mean 'cvfp'"),
        (["validate", "experiments/missing.toml"], "cannot read experiment file"),
        (["params", "experiments/v2.toml", "--set", "models.9.layers=1"], "no list element 9"),
        (["scaling", "tests/does-not-exist.csv"], "does-not-exist.csv"),
    ],
)
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line_and_no_traceback(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_traceback_flag_shows_the_stack() -> None:
    result = cli("--traceback", "validate", "experiments/missing.toml")
    assert result.returncode == 2 and "Traceback" in result.stderr


@pytest.mark.slow
def test_strict_plugins_fails_on_a_broken_plugin(tmp_path: Path) -> None:
    info = tmp_path / "bad_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[newllm_kit]\nbad = newllm_bad_case\n")
    (tmp_path / "newllm_bad_case.py").write_text("raise ImportError('needs libfoo')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    relaxed = cli("plugins", "--json", env=env)
    assert relaxed.returncode == 0
    bad = next(p for p in json.loads(relaxed.stdout)["plugins"] if p["name"] == "bad")
    assert bad["status"] == "broken" and bad["distribution"] == "bad-dist" and "needs libfoo" in bad["error"]
    strict = cli("--strict-plugins", "validate", "experiments/v2.toml", env=env)
    assert strict.returncode == 2 and "plugin 'bad' (bad-dist): ImportError: needs libfoo" in strict.stderr


@pytest.mark.slow
def test_validate_ok() -> None:
    """v2.toml with components that load without the hub (validate checks that they can load here)."""
    local = ["--set", 'data.source="embedded"', "--set", 'tokenizer.name="bytes"', "--set", 'embedding.source="random"']
    result = cli("validate", "experiments/v2.toml", *local)
    assert result.returncode == 0, result.stderr
    assert "2 model(s) × 2 training size(s) = 4 unit(s)" in result.stdout


@pytest.mark.slow
def test_params_keeps_every_count_whole_at_80_columns() -> None:
    result = cli("params", "experiments/v2.toml", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for count in ("15,394,304", "8,566,272", "38,598,912", "62,559,488", "20,730,880", "5,905,152", "65,234,944"):
        assert count in result.stdout, count
    assert "…" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["", "run", "scaling", "params", "validate", "plugins"])
def test_help_shows_plain_placeholders(command: str) -> None:
    result = cli(*([command] if command else []), "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    for placeholder in ("<bool>", "{FILE}", "...]...", "<list[", "<path>"):
        assert placeholder not in result.stdout, placeholder
    if command == "scaling":
        assert "newllm-kit scaling [OPTIONS] [SOURCE]..." in result.stdout
    if command in ("run", "params", "validate"):
        assert f"newllm-kit {command} [OPTIONS] FILE" in result.stdout


def _results(folder: Path, status: str, ppls: tuple[float, ...] = ()) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.resolved.toml").write_text("")
    (folder / "meta.json").write_text(json.dumps({"status": status}))
    if ppls:
        (folder / "results.jsonl").write_text("".join(
            json.dumps({"model": "A", "train_tokens": 1000 * 2**i, "val_ppl": p}) + "\n" for i, p in enumerate(ppls)))
    return folder


@pytest.mark.slow
def test_scaling_names_the_run_it_fitted_and_the_newer_runs_it_skipped(tmp_path: Path) -> None:
    good = _results(tmp_path / "runs" / "quickstart" / "20261201-1", "finished", (90.0, 70.0))
    failed = _results(tmp_path / "runs" / "quickstart" / "20261201-2", "failed")
    os.utime(good, (1, 1))
    text, as_json = cli("scaling", cwd=tmp_path), cli("scaling", "--json", cwd=tmp_path)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr
    source = str(Path("runs") / "quickstart" / "20261201-1" / "results.jsonl")
    skipped = (f"skipped {Path('runs', 'quickstart', failed.name)}: this run failed before any unit finished "
               f"(see meta.json)")
    assert f"source: {source}" in text.stdout and skipped in " ".join(text.stdout.split())
    report = json.loads(as_json.stdout)
    assert report["sources"] == [source] and report["warnings"][0] == skipped


def test_scaling_of_a_run_that_failed_before_any_unit_finished(tmp_path: Path) -> None:
    failed = _results(tmp_path / "run", "failed")
    result = cli("scaling", str(failed))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {failed}: this run failed before any unit finished (see meta.json)"
