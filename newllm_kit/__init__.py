"""newllm-kit: plugin-based toolkit for language-model experiments (CVFP and baselines) from TOML files."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .hf_auto import install as _register_with_transformers
from .hookspecs import hookimpl, hookspec

try:
    __version__ = version("newllm-kit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_register_with_transformers()  # exported models load with AutoModelForCausalLM; imports nothing (hf_auto)

__all__ = ["__version__", "hookimpl", "hookspec"]
