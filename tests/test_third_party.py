"""A plugin package from outside this repository, installed for real and used by name: an architecture
trained by the lm recipe, a CVFP-shaped one for the cvfp recipe, and a metric that reaches the table."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, cli

PACKAGE = Path(__file__).parent / "plugin_pkg"
GUIDE = ROOT / "docs" / "writing-plugins.md"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/plugin_pkg (pip builds in its source folder, which must not be the repository's)."""
    root = tmp_path_factory.mktemp("third_party")
    shutil.copytree(PACKAGE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return root / "src"


@pytest.fixture(scope="module")
def installed(source: Path) -> dict[str, str]:
    """pip-install the package into a private target folder; returns the env that sees it."""
    target = source.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return {"PYTHONPATH": str(target)}


BASE = """
[experiment]
name = "third-party"
samples = [20]
metrics = ["ppl", "bits_per_token"]

[data]
source = "embedded"
val = { start = 100, count = 10 }

[tokenizer]
name = "bytes"

[embedding]
source = "random"

[runner]
name = "cpu"
"""

LM = BASE + """
[lm]
epochs = 1
batch_size = 8
window = 32
warmup_steps = 2
learning_rate = 0.01

[[models]]
label = "N"
architecture = "ngram-mlp"
order = 3
"""

CVFP = BASE + """
[[models]]
label = "R"
architecture = "tanh-rnn"
context_dim = 24
"""


@pytest.mark.slow
def test_plugins_json_shows_the_installed_package(installed: dict[str, str]) -> None:
    result = cli("plugins", "--json", env=installed)
    assert result.returncode == 0, result.stderr
    example = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "example")
    assert example["distribution"] == "newllm-kit-example-plugin" and example["version"] == "0.3.0"
    assert example["components"] == {"architecture": ["ngram-mlp", "tanh-rnn"], "metric": ["bits_per_token"]}


@pytest.mark.slow
def test_its_cvfp_architecture_is_built_by_name_and_checked_for_the_cvfp_recipe(
        installed: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(CVFP)
    result = cli("params", str(path), "--json", env=installed)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["models"][0]
    # context 24×24 + token 16×24 + 24 bias; token block (24+16)×16 + 16; 256×16 byte embedding
    assert row["context_block"] == 24 * 24 + 16 * 24 + 24
    assert row["token_block"] == 40 * 16 + 16
    assert row["embedding"] == 256 * 16
    assert row["trainable"] == {"phase1": row["context_block"], "phase2": row["token_block"]}
    bad = cli("validate", str(path), "--set", "models.0.context_dim=0", env=installed)
    assert bad.returncode == 2 and "models.0.context_dim" in bad.stderr


@pytest.mark.slow
def test_its_lm_architecture_trains_and_its_metric_reaches_the_table_and_csv(
        installed: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(LM)
    result = cli("run", str(path), "--out", str(tmp_path / "runs"), "--progress", "none", env=installed)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("Model"))
    assert "Val PPL ↓" in header and "bits_per_token (bits) ↓" in header
    [run_dir] = [path.parent for path in (tmp_path / "runs" / "third-party").glob("*/results.csv")]
    with (run_dir / "results.csv").open() as handle:
        [row] = list(csv.DictReader(handle))
    assert row["model"] == "N"
    assert float(row["val_bits_per_token"]) == pytest.approx(math.log2(float(row["val_ppl"])))
    cells = next(line for line in result.stdout.splitlines() if line.startswith("N ")).split()
    assert f"{float(row['val_bits_per_token']):.2f}" in cells
    [record] = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["recipe"] == "lm" and record["params"]["trainable"] == {"train": record["params"]["mlp"]}


def without_switches() -> dict[str, str]:
    """This environment without the kit's plugin switches, as a plugin author's shell has it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NEWLLM_KIT_")}


def guide_test_snippet() -> str:
    """The testing snippet of docs/writing-plugins.md, as a plugin author would copy it."""
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.M | re.S)
    return next(block for block in blocks if block.startswith("# tests/test_plugin.py"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["installed", "not installed"])
def test_the_guides_testing_snippet_passes_installed_or_not(how: str, installed: dict[str, str],
                                                             source: Path, tmp_path: Path) -> None:
    (tmp_path / "test_plugin.py").write_text(guide_test_snippet())
    importable = tmp_path / "lib"  # the module alone: no metadata, so no entry point
    shutil.copytree(source / "src" / "newllm_example_plugin", importable / "newllm_example_plugin")
    env = installed if how == "installed" else {"PYTHONPATH": str(importable)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plugin.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**without_switches(), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("3 passed" if how == "installed" else "2 passed, 1 skipped"), summary


@pytest.mark.slow
def test_without_the_package_the_name_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(LM)
    result = cli("validate", str(path))
    assert result.returncode == 2 and "unknown architecture 'ngram-mlp'" in result.stderr
