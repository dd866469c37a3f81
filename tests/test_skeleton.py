"""`newllm-kit plugins new`: every kind's package passes its own tests, as written and once installed.

The generated tests run in a subprocess from the package folder, as their author would run them
(`python -m pytest -q`); pytest's own plugin autoload is off there only to save start-up time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from newllm_kit.errors import UserError
from newllm_kit.skeleton import KINDS, check_name, write_plugin


def run_generated_tests(package: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package, env=env,
                          capture_output=True, text=True, timeout=300)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line; built-in plugins are not loaded (their entry-point names still count as taken)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "NEWLLM_KIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "newllm_kit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_passes_its_own_tests_without_being_installed(kind: str, tmp_path: Path) -> None:
    name = f"my-{kind.replace('_', '-')}"
    write_plugin(name, kind, tmp_path)
    package = tmp_path / name
    result = run_generated_tests(package, package / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout  # only the entry-point test, which needs an installed package


@pytest.mark.slow
def test_an_installed_package_is_loaded_through_its_entry_point(tmp_path: Path) -> None:
    write_plugin("my-metric", "metric", tmp_path)
    package, site = tmp_path / "my-metric", tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(package)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    entry_points = next(site.glob("my_metric-*.dist-info")) / "entry_points.txt"
    assert entry_points.read_text().split() == ["[newllm_kit]", "my-metric", "=", "my_metric.plugin"]
    result = run_generated_tests(package, site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" not in result.stdout


def test_the_command_writes_the_package_and_lists_its_files(tmp_path: Path) -> None:
    result = cli("plugins", "new", "my-tokenizer", "--kind", "tokenizer", "--dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package = tmp_path / "out" / "my-tokenizer"
    files = ["pyproject.toml", "README.md", "src/my_tokenizer/__init__.py", "src/my_tokenizer/plugin.py",
             "tests/conftest.py", "tests/test_plugin.py"]
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == sorted(files)
    listed = [line.strip() for line in result.stdout.splitlines()]
    assert all(file in listed for file in files)
    assert 'my-tokenizer = "my_tokenizer.plugin"' in (package / "pyproject.toml").read_text()
    assert 'name = "my-tokenizer"' in (package / "README.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["new", "my-plugin", "--kind", "metrc"], "--kind: expected one of architecture, data_source, metric, "
                                              "recipe, solver, tokenizer (got 'metrc'); did you mean metric?"),
    (["new", "My Plugin", "--kind", "metric"], "plugin name 'My Plugin': use up to 32 lowercase letters"),
    (["new", "../escape", "--kind", "metric"], "plugin name '../escape'"),
    (["new", "cvfp", "--kind", "architecture"], "plugin name 'cvfp' is taken by an installed plugin"),
    (["new", "my-plugin"], "missing option '--kind'"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli("plugins", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_empty_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "my-plugin").mkdir()
    (tmp_path / "my-plugin" / "notes.txt").write_text("mine")
    result = cli("plugins", "new", "my-plugin", "--kind", "metric", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "my-plugin exists and is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "my-plugin").iterdir()] == ["notes.txt"]


def test_an_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "my-plugin").mkdir()
    assert len(write_plugin("my-plugin", "metric", tmp_path)) == 6


@pytest.mark.parametrize("name", ["my-plugin", "my_plugin", "plugin2", "a-b-c"])
def test_valid_names(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["", "-x", "x-", "a--b", "2x", "a.b", "a/b", "class", "x" * 33, "json", "torch"])
def test_names_that_cannot_be_a_distribution_or_would_shadow_a_module(name: str) -> None:
    with pytest.raises(UserError, match="plugin name"):
        check_name(name)


def test_a_component_name_already_registered_is_taken() -> None:
    with pytest.raises(UserError, match="is taken"):
        check_name("ppl", taken={"ppl", "accuracy"})


def test_plugins_still_lists_without_a_subcommand(tmp_path: Path) -> None:
    listed = cli("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.startswith("{")
    assert "plugins new NAME --kind KIND" in cli("plugins", "--help", cwd=tmp_path).stdout
