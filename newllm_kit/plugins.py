"""Loading plugins safely: entry points one at a time, every failure attributed and reported.

A broken plugin never takes the CLI down: it is recorded (name, distribution, one-line reason)
and the others still load. `--strict-plugins` turns any such problem into an error.

Environment switches (as in pytest):
* `NEWLLM_KIT_DISABLE_PLUGIN_AUTOLOAD=1` — load no entry points except those named in
  `NEWLLM_KIT_PLUGINS` (comma-separated entry-point names).
* `NEWLLM_KIT_DISABLE_PLUGINS=a,b` — skip these entry points.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import Component, DuplicateComponent, Registry, is_plugin_error, one_line, signals_seen

ENTRY_POINT_GROUP = "newllm_kit"

COMMANDS_HOOK = "register_commands"


def kind_of(hook_name: str) -> str:
    """The component kind a `register_*` hook registers: `register_data_sources` → `data_source`."""
    return hook_name.removeprefix("register_").removesuffix("s")


def registration_hooks(manager: pluggy.PluginManager) -> dict[str, str]:
    """Every `register_*` hook with a specification (the core's and those plugins declare) → its kind."""
    return {name: kind_of(name) for name in sorted(_specified_hooks(manager)) if name != COMMANDS_HOOK}


def _specified_hooks(manager: pluggy.PluginManager) -> set[str]:
    return {name for name, caller in vars(manager.hook).items() if caller.has_spec()}


def _add_declared_kinds(manager: pluggy.PluginManager, plugin: object) -> None:
    """Add the hookspecs a plugin module (or class) declares (`@newllm_kit.hookspec def
    register_<kind>s(register)`): a kind of component of its own, such as the cvfp recipe's solvers."""
    if not isinstance(plugin, ModuleType | type):
        return
    declared = [attr for attr in dir(plugin) if manager.parse_hookspec_opts(plugin, attr) is not None]
    if not declared:
        return
    for name in declared:
        if not (name.startswith("register_") and name.endswith("s") and kind_of(name).isidentifier()):
            raise PluginError(f"hookspec {name!r}: a plugin declares kinds only, as register_<kind>s(register)")
        if name in _specified_hooks(manager):
            raise PluginError(f"hookspec {name!r} is already declared (by the core or another plugin)")
    manager.add_hookspecs(plugin)


@dataclass
class PluginInfo:
    """What `newllm-kit plugins` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # ok | broken | conflict | disabled
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    traceback: str | None = None  # the full stack behind `error`, for `--traceback`; not in to_json

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "hooks": self.hooks,
            "components": self.components,
        }


@dataclass
class Plugins:
    """The loaded plugin manager, the registry computed from it, and a report per plugin."""

    manager: pluggy.PluginManager
    registry: Registry
    infos: list[PluginInfo]

    def problems(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.status in ("broken", "conflict")]


def _mark_broken(info: PluginInfo, error: BaseException, prefix: str = "") -> None:
    info.status, info.error = "broken", prefix + one_line(error)
    info.traceback = "".join(traceback.format_exception(error))


def _mark_broken_or_stop(info: PluginInfo, error: BaseException, seen: list[int], prefix: str = "") -> None:
    """`info`'s plugin is broken by `error`, unless it is a Ctrl-C or SIGTERM (a signal in `seen`):
    then the user stops the command, whatever plugin was loading."""
    if not is_plugin_error(error, seen):
        raise error
    _mark_broken(info, error, prefix)


def _env_list(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def _selected_entry_points() -> Iterable[tuple[EntryPoint, bool]]:
    """Entry points in a stable order, each with whether it is enabled."""
    autoload = os.environ.get("NEWLLM_KIT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    wanted, disabled = _env_list("NEWLLM_KIT_PLUGINS"), _env_list("NEWLLM_KIT_DISABLE_PLUGINS")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        enabled = (autoload or ep.name in wanted) and ep.name not in disabled
        yield ep, enabled


def _unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations in `plugin` whose names match no hookspec: typos (register_metric), or a
    kind whose declaring plugin is not loaded."""
    known = sorted(name.removeprefix("register_") for name in _specified_hooks(manager))
    found = []
    for attr in dir(plugin):
        if manager.parse_hookimpl_opts(plugin, attr) is None or attr.removeprefix("register_") in known:
            continue
        close = difflib.get_close_matches(attr.removeprefix("register_"), known, n=1)
        if close:
            hint = f" (did you mean 'register_{close[0]}'?)"
        elif attr.startswith("register_"):
            hint = f" (no loaded plugin declares the kind {kind_of(attr)!r}: install or enable the one that does)"
        else:
            hint = ""
        found.append(f"unknown hook {attr!r}{hint}")
    return found


def load_plugins(extra: Iterable[tuple[str, object]] = (), strict: bool = False) -> Plugins:
    """Load entry-point plugins plus `extra` (name, object) pairs and build the registry.

    With `strict`, the first broken plugin raises PluginError; otherwise problems are recorded
    in the returned infos and in `registry.unavailable`. What plugins print while loading goes to
    stderr: stdout carries only a command's output (one JSON document under `--json`).
    """
    with redirect_stdout(sys.stderr), signals_seen() as seen:
        plugins = _load(extra, seen)
    if strict and plugins.problems():
        first = plugins.problems()[0]
        raise PluginError(f"plugin {first.name!r} ({first.distribution or 'local'}): {first.error}")
    return plugins


def _load(extra: Iterable[tuple[str, object]], seen: list[int]) -> Plugins:
    """Every plugin loaded, each failure recorded against its plugin; a KeyboardInterrupt that a signal
    in `seen` caused stops the loading instead."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    candidates: list[tuple[PluginInfo, object | None]] = []
    for ep, enabled in _selected_entry_points():
        dist = ep.dist
        info = PluginInfo(ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None)
        infos.append(info)
        if not enabled:
            info.status = "disabled"
            continue
        try:
            candidates.append((info, ep.load()))
        except BaseException as error:  # any import-time failure of third-party code, sys.exit included
            _mark_broken_or_stop(info, error, seen)
    for name, obj in extra:
        info = PluginInfo(name)
        infos.append(info)
        candidates.append((info, obj))

    for info, obj in candidates:  # kinds first, so any plugin may register components of them
        try:
            _add_declared_kinds(manager, obj)
        except BaseException as error:  # a malformed or duplicate hookspec
            _mark_broken_or_stop(info, error, seen)
    for info, obj in candidates:
        if info.status == "broken":
            continue
        try:
            typos = _unknown_hooks(manager, obj)
            if typos:
                info.status, info.error = "broken", "; ".join(typos)
                continue
            manager.register(obj, name=info.name)
        except BaseException as error:  # pluggy validation (bad signatures), a duplicate plugin name, …
            _mark_broken_or_stop(info, error, seen)
            continue
        info.hooks = sorted(c.name for c in manager.get_hookcallers(obj) or [])
    manager.check_pending()

    hooks = registration_hooks(manager)
    registry = Registry(kinds=tuple(hooks.values()))
    by_name = {i.name: i for i in infos}
    for hook_name, kind in hooks.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            info = by_name[impl.plugin_name]
            if info.status != "ok":
                continue
            _call_registration(impl.function, kind, info, registry, seen)
    for info in infos:
        if info.status == "ok" or info.status == "conflict":
            info.components = registry.by_plugin(info.name)
        if info.status == "broken":
            registry.unavailable[info.name] = info.error or "unknown error"
            if manager.is_registered(manager.get_plugin(info.name)):
                manager.unregister(name=info.name)
    return Plugins(manager, registry, infos)


def _call_registration(function: Any, kind: str, info: PluginInfo, registry: Registry, seen: list[int]) -> None:
    """Call one plugin's register_* hook with a callback that attributes components to it."""

    def register(name: str, factory: Any, *, settings: Any = None, description: str = "") -> None:
        try:
            registry.add(Component(kind, name, factory, info.name, settings, description))
        except DuplicateComponent as error:  # only this name is disabled; the plugin's other components load
            info.status = "conflict"
            info.error = f"{info.error}; {error}" if info.error else str(error)

    try:
        function(register=register)
    except BaseException as error:  # a plugin's own bug inside its hook, sys.exit included
        _mark_broken_or_stop(info, error, seen, f"{function.__name__} raised ")
        registry.drop_plugin(info.name)
