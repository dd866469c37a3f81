"""A plugin package from outside this repository, installed for real and used by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import cli

PACKAGE = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """pip-install tests/plugin_pkg into a private target folder; returns the env that sees it."""
    root = tmp_path_factory.mktemp("third_party")
    source = root / "src"
    shutil.copytree(PACKAGE, source)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return {"PYTHONPATH": str(target)}


TOML = """
[experiment]
name = "third-party"
samples = [20, 40]
metrics = ["ppl", "bits_per_token"]

[data]
source = "embedded"
val = { start = 100, count = 10 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[[models]]
label = "R"
architecture = "tanh-rnn"
context_dim = 24
"""


def test_plugins_json_shows_the_installed_package(installed: dict[str, str]) -> None:
    result = cli("plugins", "--json", env=installed)
    assert result.returncode == 0, result.stderr
    example = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "example")
    assert example["distribution"] == "newllm-kit-example-plugin" and example["version"] == "0.3.0"
    assert example["components"] == {"architecture": ["tanh-rnn"], "metric": ["bits_per_token"]}


def test_its_architecture_is_built_by_name_from_toml(installed: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(TOML)
    result = cli("params", str(path), "--json", env=installed)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["models"][0]
    # context 24×24 + token 16×24 + 24 bias; token block (24+16)×16 + 16; 256×16 byte embedding
    assert row["context_block"] == 24 * 24 + 16 * 24 + 24
    assert row["token_block"] == 40 * 16 + 16
    assert row["embedding"] == 256 * 16
    bad = cli("validate", str(path), "--set", "models.0.context_dim=0", env=installed)
    assert bad.returncode == 2 and "models.0.context_dim" in bad.stderr


def test_without_the_package_the_name_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(TOML)
    result = cli("validate", str(path))
    assert result.returncode == 2 and "unknown architecture 'tanh-rnn'" in result.stderr
