"""The follow-up experiment files: each states its question, and its quick offline variant (the
`--set` lines of its header) validates as the embedded-corpus run it promises."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from newllm_kit.config import load_config
from newllm_kit.experiment import plan
from newllm_kit.plugins import load_plugins
from newllm_kit.registry import Registry

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FOLLOW_UPS = {"v2-seeds.toml": 4 * 3, "effective-rank.toml": 9 * 2, "gradual-vs-cvfp.toml": 2 * 2 * 2 * 3}


def quick_overrides(path: Path) -> list[str]:
    """The `#   --set KEY=VALUE` lines below the header's "Quick variant", split as a shell would."""
    header = path.read_text().split("[experiment]")[0]
    words: list[str] = []
    for line in header.split("# Quick variant")[1].splitlines():
        if re.match(r"#\s+--set ", line):
            words += shlex.split(line.lstrip("#"))
    return [words[i + 1] for i, word in enumerate(words) if word == "--set"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_plugins().registry


@pytest.mark.parametrize(("name", "units"), sorted(FOLLOW_UPS.items()))
def test_the_full_experiment_and_its_question(registry: Registry, name: str, units: int) -> None:
    """The file plans the units it was written for, and its header's question states that count (the
    quick variant below it is checked by the next test)."""
    path = EXPERIMENTS / name
    assert len(plan(load_config(path, registry))) == units
    header = path.read_text().split("# Question:")[1].split("# Quick variant")[0]
    question = " ".join(line.lstrip("#").strip() for line in header.splitlines())
    assert re.findall(r"\b(\d+) units\b", question) == [str(units)]


@pytest.mark.parametrize("name", sorted(FOLLOW_UPS))
def test_the_quick_variant_runs_offline_on_the_embedded_corpus(registry: Registry, name: str) -> None:
    overrides = quick_overrides(EXPERIMENTS / name)
    config = load_config(EXPERIMENTS / name, registry, overrides)
    for _, variant in config.variant_configs():
        resolved = variant.resolved()
        assert resolved["data"]["source"] == "embedded" and resolved["tokenizer"]["name"] == "bpe"
        assert resolved["embedding"]["source"] == "random" and resolved["runner"]["name"] == "cpu"
        assert [m.get("context_dim") for m in resolved["models"]][:1] == [64]  # the quick-start's shapes
    assert len(plan(config)) <= 12  # minutes, not hours
