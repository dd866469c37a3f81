"""The registry of named components, computed from the plugins' `register_*` hooks.

A TOML file names components (`architecture = "cvfp"`, `[tokenizer] name = "gpt2"`); this module
maps each (kind, name) to exactly one factory and remembers which plugin supplied it, so two
plugins can never silently shadow each other.
"""

from __future__ import annotations

import difflib
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pydantic import BaseModel

from .errors import PluginError

# The core's kinds; a plugin may declare more (newllm_kit.plugins.registration_hooks).
KINDS = ("architecture", "recipe", "tokenizer", "embedding", "metric", "data_source", "runner", "launcher",
         "tracker")


@contextmanager
def signals_seen() -> Iterator[list[int]]:
    """Around plugin code: the SIGINT/SIGTERM signals that arrived, so a KeyboardInterrupt from a real
    Ctrl-C (or SIGTERM) still stops the command, while one a plugin raised itself (like its
    `sys.exit`) is that plugin's error. Off the main thread no handler can be set: every
    KeyboardInterrupt then counts as a real one."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        seen.append(signal.SIGINT)
        yield seen
        return
    installed: dict[signal.Signals, tuple[Any, Any]] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if not callable(previous):  # SIG_DFL / SIG_IGN: no KeyboardInterrupt comes from it
            continue

        def note(number: int, frame: FrameType | None, previous: Any = previous) -> None:
            seen.append(number)
            previous(number, frame)

        signal.signal(signum, note)
        installed[signum] = (note, previous)
    try:
        yield seen
    finally:
        for number, (note, previous) in installed.items():
            if signal.getsignal(number) is note:  # the handler may have reset itself (a second SIGTERM kills)
                signal.signal(number, previous)


def is_plugin_error(error: BaseException, seen: list[int]) -> bool:
    """Whether `error`, escaping plugin code, is that plugin's failure: any exception, `sys.exit`, a
    KeyboardInterrupt no signal caused; not a Ctrl-C or SIGTERM in `seen`, which stops the command."""
    return not (isinstance(error, KeyboardInterrupt) and seen)


def one_line(error: BaseException) -> str:
    """`error` as "Type: first line", with the two a plugin may use to leave (sys.exit, KeyboardInterrupt)
    said in words: their text alone ("0", "") would explain nothing."""
    if isinstance(error, SystemExit):
        return f"SystemExit: sys.exit({error.code!r}) was called"
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt: raised by the plugin itself (no Ctrl-C or SIGTERM arrived)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class DuplicateComponent(PluginError):
    """A second plugin registered a (kind, name) already taken: that name is disabled, nothing else."""


@dataclass(frozen=True)
class Component:
    """One registered component: what a TOML name resolves to."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    settings: type[BaseModel] | None = None
    description: str = ""


@dataclass
class Registry:
    """Components by kind and name; duplicates and unknown names are user errors."""

    kinds: tuple[str, ...] = KINDS
    components: dict[str, dict[str, Component]] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in self.kinds:
            self.components.setdefault(kind, {})

    def add(self, component: Component) -> None:
        if component.kind not in self.components:
            raise PluginError(
                f"plugin {component.plugin!r} registered unknown kind {component.kind!r}; "
                f"kinds are {', '.join(self.components)}"
            )
        if not component.name or not isinstance(component.name, str):
            raise PluginError(f"plugin {component.plugin!r} registered a {component.kind} with an empty name")
        if not callable(component.factory):
            raise PluginError(
                f"plugin {component.plugin!r} registered {component.kind} {component.name!r} "
                f"with a factory that is not callable"
            )
        if component.settings is not None and not (
            isinstance(component.settings, type) and issubclass(component.settings, BaseModel)
        ):
            raise PluginError(
                f"plugin {component.plugin!r}: settings of {component.kind} {component.name!r} "
                f"must be a pydantic BaseModel subclass"
            )
        existing = self.components[component.kind].get(component.name)
        if existing is not None:
            plugins = self.conflicts.setdefault((component.kind, component.name), [existing.plugin])
            plugins.append(component.plugin)
            raise DuplicateComponent(
                f"{component.kind} {component.name!r} is registered by both plugin "
                f"{existing.plugin!r} and plugin {component.plugin!r}; uninstall or disable one "
                f"(NEWLLM_KIT_DISABLE_PLUGINS={component.plugin})"
            )
        self.components[component.kind][component.name] = component

    def get(self, kind: str, name: str, where: str = "") -> Component:
        """The component called `name`, or a UserError with the closest valid names."""
        prefix = f"{where}: " if where else ""
        label = kind.replace("_", " ")
        if (kind, name) in self.conflicts:
            both = " and ".join(repr(p) for p in self.conflicts[(kind, name)])
            raise PluginError(
                f"{prefix}{label} {name!r} is registered by plugins {both}; uninstall or disable all but one"
            )
        found = self.components.get(kind, {}).get(name)
        if found is not None:
            return found
        choices = sorted(self.components.get(kind, {}))
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        available = ", ".join(choices) or "none installed"
        broken = "".join(f"; plugin {p!r} failed to load ({why})" for p, why in self.unavailable.items())
        disabled = "".join(f"; {label} {n!r} is disabled: registered by plugins {' and '.join(map(repr, plugins))}"
                           for (k, n), plugins in self.conflicts.items() if k == kind)
        raise PluginError(f"{prefix}unknown {label} {name!r}{hint} (available: {available}){broken}{disabled}")

    def drop_plugin(self, plugin: str) -> None:
        """Forget every component `plugin` registered, and its claims in conflicts (it is broken)."""
        for comps in self.components.values():
            for name in [n for n, c in comps.items() if c.plugin == plugin]:
                del comps[name]
        for key, plugins in list(self.conflicts.items()):
            remaining = [p for p in plugins if p != plugin]
            if len(remaining) < len(plugins) and len(remaining) <= 1:
                del self.conflicts[key]
            else:
                self.conflicts[key] = remaining

    def names(self, kind: str) -> list[str]:
        return sorted(self.components.get(kind, {}))

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        """Component names a plugin registered, by kind (for `newllm-kit plugins`)."""
        out: dict[str, list[str]] = {}
        for kind, comps in self.components.items():
            names = sorted(c.name for c in comps.values() if c.plugin == plugin)
            if names:
                out[kind] = names
        return out
