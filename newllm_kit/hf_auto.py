"""Registers the kit's exported models with `transformers`' Auto classes, without importing it.

`import newllm_kit` calls `install()`. Importing `transformers` to register eagerly would cost
`import newllm_kit` seconds (measured on 2 cores: `from transformers import AutoConfig` 3.5 s,
`PreTrainedModel` with torch 7.7 s, against 0.04 s for the whole kit, this module ~1 ms), so the
registration follows transformers' own imports instead: once
`transformers.models.auto.configuration_auto` has run, `NewllmKitConfig` is registered with
`AutoConfig`; once `transformers.models.auto.modeling_auto` has, `NewllmKitForCausalLM` with
`AutoModelForCausalLM`. A module already imported when the kit is is registered at once; one
imported later is caught by a finder on `sys.meta_path` that runs the registration right after the
module's own code, and removes itself when both are done. Whatever the order of the imports,
`AutoModelForCausalLM.from_pretrained(DIR)` finds the kit's model by the "newllm-kit" `model_type`
of DIR's config.json, with no remote code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from .hf_config import MODEL_TYPE, NewllmKitConfig

    AutoConfig.register(MODEL_TYPE, NewllmKitConfig, exist_ok=True)


def _register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from .hf_config import NewllmKitConfig
    from .hf_model import NewllmKitForCausalLM

    AutoModelForCausalLM.register(NewllmKitConfig, NewllmKitForCausalLM, exist_ok=True)


def _run(name: str, action: Callable[[], None]) -> None:
    """A failed registration must not break the user's `transformers` import: it warns instead."""
    try:
        action()
    except Exception as error:
        warnings.warn(f"newllm-kit: could not register its models with transformers after importing {name} "
                      f"({type(error).__name__}: {error}); AutoModelForCausalLM will not load newllm-kit "
                      f"exports", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module, takes the spec the other finders give and makes its
    loader run the registration after the module's code."""

    def __init__(self, actions: dict[str, Callable[[], None]]) -> None:
        self.actions = actions

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.actions:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        loader: Any = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        action, execute = self.actions.pop(fullname), loader.exec_module
        if not self.actions and self in sys.meta_path:
            sys.meta_path.remove(self)

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _run(fullname, action)

        loader.exec_module = exec_module  # this module's own loader object, made for this spec
        return spec


def install() -> None:
    """Register now what `transformers` has imported, and after its import what it has not (idempotent)."""
    if any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        return
    pending: dict[str, Callable[[], None]] = {}
    for name, action in ((CONFIG_AUTO, _register_config), (MODELING_AUTO, _register_model)):
        if name in sys.modules:
            _run(name, action)
        else:
            pending[name] = action
    if pending:
        sys.meta_path.insert(0, _AfterImport(pending))
