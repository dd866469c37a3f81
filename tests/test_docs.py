"""The docs mirror the code: every hook documented, README commands real."""

from __future__ import annotations

import inspect
from pathlib import Path

from newllm_kit import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("register_")]


def test_every_hook_has_a_docstring_with_an_example() -> None:
    for name in hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Example" in doc, name


def test_every_hook_is_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "writing-plugins.md").read_text()
    for name in hook_names():
        assert f"`{name}(" in guide, name


def test_readme_opens_with_install_and_test_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].endswith("newllm-kit run experiments/quickstart.toml")
    assert block[1] == "python -m pytest"
    assert (ROOT / "experiments" / "quickstart.toml").exists()


def test_ci_runs_the_readme_test_command() -> None:
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_changelog_records_this_version() -> None:
    from newllm_kit import __version__

    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_readme_says_up_front_how_to_get_a_cpu_or_cuda_torch() -> None:
    top = "\n".join((ROOT / "README.md").read_text().splitlines()[:35])
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in top
    assert "CUDA" in top


def test_docs_spell_the_gpt2_location_key_one_way() -> None:
    """`name_or_path` everywhere; `path` is only an alias, so the docs never teach it as the key."""
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "experiments").glob("*.toml")),
             *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    for text in texts:
        assert "tokenizer.path" not in text and "embedding.path" not in text
    assert "tokenizer.name_or_path" in texts[0]
