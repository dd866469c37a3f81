"""Reading a `[sweep]` table (dotted keys → value lists, checked against the `--set` overrides) and a
short name for each combination (`drw-0.3_cn-0.1`) that unit ids and checkpoints use. The `Sweep`
and `Variant` records live in `schema`, beside the `ExperimentConfig` that holds them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .reading import parse_override
from .schema import NAME_PATTERN, Sweep, safe_name


def parse_sweep(path: Path, raw: Any, overrides: list[str]) -> Sweep | None:
    """The `[sweep]` table as keys and value lists; nested tables (`[sweep.solver]`) count as dotted keys."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: sweep: must be a table of dotted keys → value lists, e.g. '
                          f'"solver.dist_reg_weight" = [0.3, 0.5]')
    labels = raw.pop("labels", None)
    flat: dict[str, Any] = {}
    _flatten_sweep(path, raw, "", flat)
    if not flat:
        raise ConfigError(f'{path}: sweep: empty; add a key, e.g. "solver.dist_reg_weight" = [0.3, 0.5]')
    for key, values in flat.items():
        if "." not in key or key.split(".")[0] in ("experiment", "sweep"):
            raise ConfigError(f"{path}: sweep.{key}: name a key inside a section other than [experiment], e.g. "
                              f'"solver.dist_reg_weight" (sizes and seeds are experiment.samples and .seeds)')
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: sweep.{key}: expected a non-empty list of values (got {values!r})")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{path}: sweep.{key}: a value is listed twice; list each value once")
    for text in overrides:
        parts, _ = parse_override(text)
        dotted = ".".join(parts)
        clash = next((k for k in flat if dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + ".")),
                     None)
        if clash is not None and parts[0] != "sweep":
            raise ConfigError(f"--set {text!r}: {clash} is swept in [sweep] of {path}; set its values instead: "
                              f"--set 'sweep.{clash}=[…]'")
    sweep = Sweep(list(flat), list(flat.values()), None)
    count = len(sweep.combinations())
    if labels is not None:
        if (not isinstance(labels, list) or len(labels) != count or not all(isinstance(x, str) for x in labels)
                or len(set(labels)) != count):
            raise ConfigError(f"{path}: sweep.labels: expected {count} distinct names, one per combination "
                              f"(the first key varies slowest)")
        for label in labels:
            try:
                safe_name(label, "the variant's checkpoints")
            except ValueError as error:
                raise ConfigError(f"{path}: sweep.labels: {label!r} {error}") from None
    return Sweep(sweep.keys, sweep.values, labels)


def _flatten_sweep(path: Path, table: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            _flatten_sweep(path, value, dotted, out)
        elif dotted in out:
            raise ConfigError(f"{path}: sweep.{dotted}: given twice; keep one")
        else:
            out[dotted] = value


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def variant_names(sweep: Sweep) -> list[str]:
    """Short names from the changed keys, `drw-0.3_cn-0.1` for solver.dist_reg_weight = 0.3 and
    solver.context_noise = 0.1: each key's last part, as its initials when it is longer than 8
    characters (the whole dotted key where two swept keys would share a name), and the value."""
    leaves = [k.split(".")[-1] for k in sweep.keys]
    shorts = ["".join(w[:1] for w in leaf.split("_")) if len(leaf) > 8 and "_" in leaf else leaf for leaf in leaves]
    shorts = [short if shorts.count(short) == 1 else key for short, key in zip(shorts, sweep.keys, strict=True)]
    names = []
    for i, combination in enumerate(sweep.combinations(), start=1):
        text = "_".join(f"{short}-{_value_text(v)}" for short, v in zip(shorts, combination.values(), strict=True))
        names.append(text if NAME_PATTERN.fullmatch(text) and ".." not in text else f"variant{i}")
    return [name if names.count(name) == 1 else f"variant{i}" for i, name in enumerate(names, start=1)]


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else json.dumps(value)
    return _UNSAFE.sub("-", str(text)).strip("-") or "x"
