"""Experiment files as plain data: reading the TOML (size and nesting limits, one-line errors)
and applying `--set key=value` overrides before anything is validated.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..user_files import read_bounded

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16


def read_toml(path: Path) -> dict[str, Any]:
    data = read_bounded(path, MAX_FILE_BYTES, "experiment file", ConfigError)
    try:
        value = tomllib.loads(data.decode("utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError:  # before ValueError, its base class
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except ValueError:  # int() refuses more than 4300 digits
        raise ConfigError(f"{path}: invalid TOML: an integer with thousands of digits; TOML integers "
                          f"are 64-bit") from None
    except RecursionError:
        raise ConfigError(f"{path}: nesting too deep (limit {MAX_DEPTH} levels)") from None
    _check_depth(str(path), value, 0)
    return value


def _check_depth(where: str, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nesting too deep (limit {MAX_DEPTH} levels)")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_depth(where, child, depth + 1)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=<TOML literal>` -> (["a", "b", "0", "c"], value); a bare word is a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=<TOML value>, e.g. --set models.0.layers=4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer of thousands of digits
        value = raw.strip()  # the shell ate the quotes of a string: data.source=embedded
    except RecursionError:
        raise ConfigError(f"--set {key}: value: nesting too deep (limit {MAX_DEPTH} levels)") from None
    _check_depth(f"--set {key}: value", value, len(key.split(".")))
    return key.split("."), value


def apply_override(data: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    if parts[0] == "sweep" and len(parts) > 1:  # `--set sweep.solver.lr=[…]` names one swept key, dots and all
        sweep = data.setdefault("sweep", {})
        if not isinstance(sweep, dict):
            raise ConfigError(f"--set {text!r}: sweep is a value, not a table")
        sweep[".".join(parts[1:])] = value
        return
    set_key(data, parts, value, f"--set {text!r}")


def set_key(data: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    """Put `value` at the dotted key `parts` (list elements by index); `what` starts any error."""
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}: {where}: no list element {part} (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{what}: {'.'.join(parts[:depth])} is a value, not a table")


def dotted_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (`{"lm": {"epochs": 3}}` → `{"lm.epochs": 3}`), an array of tables by
    index (`models.0.label`), other values as they are: how `--set` names a key."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(dotted_keys(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(dotted_keys(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}
