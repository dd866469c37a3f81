"""Shared fixtures: plugin loading without installed packages, local data fixtures, and a fake CUDA
backend."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fake_cuda import FakeCuda

from newllm_kit import cuda

HERE = Path(__file__).parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, so each gets one torch thread instead of all of them, and
    # so do the CLI processes the tests start (a result compared across them depends on the thread count)
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def load_case(name: str) -> ModuleType:
    """Import tests/plugin_cases/<name>.py as a module object (never via sys.path)."""
    path = HERE / "plugin_cases" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"plugin_case_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_cuda() -> Iterator[FakeCuda]:
    """A fake GPU (two 24 GiB devices) as the active CUDA backend for one test; its fields can change."""
    fake = FakeCuda()
    previous = cuda.set_backend(fake)
    try:
        yield fake
    finally:
        cuda.set_backend(previous)


@pytest.fixture
def no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWLLM_KIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("NEWLLM_KIT_PLUGINS", raising=False)


def make_fake_dist(root: Path, monkeypatch: pytest.MonkeyPatch, dist: str, version: str,
                   entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution made of files: a .dist-info with entry_points.txt, on sys.path."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[newllm_kit]\n{lines}")
    for filename, text in modules.items():
        (root / filename).write_text(text)
    monkeypatch.syspath_prepend(str(root))
