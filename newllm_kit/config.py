"""Experiment files: TOML -> validated, typed config, with `--set` overrides and provenance.

Core keys live in the section models below; every other key of a section belongs to the
component the section names (`[data] source = "ultrachat"` → that data source's settings model),
so a third-party plugin's keys are validated exactly like the built-ins'. Every other top-level
table belongs to a recipe in use (`[solver]` and `[phase2]` to cvfp, `[lm]` to lm) and is
validated by that recipe's settings model. Defaults reproduce the seed's v2 experiment.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import ConfigError, PluginError, UserError
from .protocols import PROTOCOLS, LanguageModel, missing_members, missing_methods
from .registry import Component, Registry

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16
TEXT_SCHEMES = ("first_turn", "first_turn_128", "all_turns", "all_turns_space_512")
# Experiment names and model labels become folder and file names in the run directory: matched
# with fullmatch (`$` would let a trailing newline through) and never containing '..'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# numpy seeds modulo 2**32: a larger seed would silently repeat a smaller one's numpy stream.
SEED_MAX = 2**32 - 1
# Documents and rows: far beyond any corpus, far below where row arithmetic overflows int64.
ROWS_MAX = 10**9
INT64 = (-(2**63), 2**63 - 1)  # TOML integers are 64-bit; tomllib accepts any size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    """A section whose extra keys are the named component's settings."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ExperimentSection(_Strict):
    name: str = Field("experiment", description="Run directory name under the output root.")
    description: str = Field("", description="Free text recorded in meta.json.")
    samples: list[int] = Field([500, 1000], min_length=1, description="Training sizes (documents).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for Python, NumPy and torch before each unit.")
    seeds: list[int] | None = Field(None, min_length=1, description="Replicates: every unit once per seed "
                                    "(default: the single `seed`).")
    metrics: list[str] = Field(
        ["ppl", "accuracy", "effective_rank", "convergence_rate"], description="Metric plugins to report."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return safe_name(value, "a folder under the output root")

    @field_validator("samples")
    @classmethod
    def _positive_unique(cls, value: list[int]) -> list[int]:
        if any(not 1 <= v <= ROWS_MAX for v in value):
            raise ValueError(f"every training size must be between 1 and {ROWS_MAX:,}")
        if len(set(value)) != len(value):
            raise ValueError("training sizes must be distinct")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 <= v <= SEED_MAX for v in value):
            raise ValueError(f"every seed must be between 0 and {SEED_MAX:,}")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value

    def seed_list(self) -> list[int]:
        """The seeds every model × size runs with: `seeds`, else the single `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]


def safe_name(value: str, names: str) -> str:
    """`value` if it can name a file or folder inside the run directory, else a ValueError."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"must be 1–100 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', "
            f"no '..'): it names {names}, which a run may not leave"
        )
    return value


class ValRows(_Strict):
    start: int = Field(1000, ge=0, le=ROWS_MAX, description="First validation row of the corpus.")
    count: int = Field(50, ge=1, le=ROWS_MAX, description="Number of validation rows.")


class DataSection(_Open):
    source: str = Field("ultrachat", description="Data-source plugin name.")
    text: Literal["first_turn", "first_turn_128", "all_turns", "all_turns_space_512"] = Field(
        "first_turn", description="Text scheme (spec §1.2): T2, T1, T3, T4."
    )
    train_start: int = Field(0, ge=0, le=ROWS_MAX, description="First training row; training = k rows from here.")
    val: ValRows = Field(default_factory=lambda: ValRows())


class TokenizerSection(_Open):
    name: str = Field("gpt2", description="Tokenizer plugin name.")


class EmbeddingSection(_Open):
    source: str = Field("gpt2", description="Embedding plugin name (pretrained wte, or random).")
    freeze: bool = Field(True, description="Keep the embedding (and the tied head) fixed.")


class ComponentSection(_Open):
    """A recipe's table that names a component of another kind by `name`, e.g. the cvfp recipe's
    `[solver]`: its other keys are that component's settings. Subclasses set `kind` (the registry
    kind) and `protocol` (what the built component must provide); `build()` returns it."""

    kind: ClassVar[str] = ""
    protocol: ClassVar[type | None] = None
    name: str = Field(..., description="Plugin name of the component.")
    _choice: Choice | None = PrivateAttr(default=None)

    def build(self) -> Any:
        if self._choice is None:
            raise RuntimeError(f"{type(self).__name__}: not resolved by newllm_kit.config")
        return self._choice.build()


class RunnerSection(_Open):
    name: str = Field("auto", description="Runner plugin name: auto picks gpu when CUDA is available.")


class ModelSection(_Open):
    label: str = Field(..., description="Name of this model in tables, fits and checkpoint names.")
    architecture: str = Field("cvfp", description="Architecture plugin name.")
    recipe: str | None = Field(None, description="Recipe plugin that trains it (default: the architecture's).")

    @field_validator("label")
    @classmethod
    def _safe_label(cls, value: str) -> str:
        return safe_name(value, "checkpoint files in the run directory")


class FileSchema(_Strict):
    experiment: ExperimentSection = Field(default_factory=lambda: ExperimentSection())
    data: DataSection = Field(default_factory=lambda: DataSection())
    tokenizer: TokenizerSection = Field(default_factory=lambda: TokenizerSection())
    embedding: EmbeddingSection = Field(default_factory=lambda: EmbeddingSection())
    runner: RunnerSection = Field(default_factory=lambda: RunnerSection())
    models: list[ModelSection] = Field(..., min_length=1)


@dataclass
class Choice:
    """A section resolved to its component and validated settings."""

    key: str
    component: Component
    settings: BaseModel | None
    where: str = ""  # "exp.toml: models.0": what errors about this choice point at
    protocol: type | None = None  # what the built object must provide (default: the kind's protocol)

    def build(self) -> Any:
        """The component's object, checked against its protocol before anything uses it."""
        c = self.component
        try:
            built = c.factory(self.settings)
        except UserError:
            raise
        except Exception as error:  # a plugin's bug: name the plugin, keep the cause for --traceback
            text = (str(error).strip().splitlines() or [""])[0]
            raise PluginError(f"{self._prefix()}plugin {c.plugin!r}: building {c.kind.replace('_', ' ')} "
                              f"{c.name!r} failed: {type(error).__name__}: {text}") from error
        protocol = self.protocol or PROTOCOLS.get(c.kind)
        if protocol is not None:
            self.require(built, protocol, "returned")
        return built

    def require(self, obj: object, protocol: type, verb: str, advice: str = "") -> None:
        """A PluginError naming the plugin, the component and the first member of `protocol` that `obj`
        lacks; of a class (no instance yet), only its methods can be checked. `advice` replaces the
        closing "fix the plugin or choose another <kind>"."""
        missing = missing_methods(obj, protocol) if isinstance(obj, type) else missing_members(obj, protocol)
        if missing:
            c, kind = self.component, self.component.kind.replace("_", " ")
            what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
            others = f" (also {', '.join(missing[1:])})" if missing[1:] else ""
            raise PluginError(f"{self._prefix()}plugin {c.plugin!r}: {kind} {c.name!r} {verb} {what}, which lacks "
                              f"{missing[0]!r}{others} required by {protocol.__module__}.{protocol.__name__}; "
                              f"{advice or f'fix the plugin or choose another {kind}'}")

    def _prefix(self) -> str:
        return f"{self.where}: " if self.where else ""


@dataclass
class ExperimentConfig:
    path: Path
    schema: FileSchema
    data_source: Choice
    tokenizer: Choice
    embedding: Choice
    runner: Choice
    models: list[tuple[str, Choice]]
    metrics: list[Choice]
    recipes: dict[str, Choice] = field(default_factory=dict)  # by recipe name; settings: the tables it owns
    model_recipes: list[str] = field(default_factory=list)  # the recipe of each [[models]] entry
    overrides: list[str] = field(default_factory=list)
    sweep: Sweep | None = None
    variants: list[Variant] = field(default_factory=list)  # one per sweep combination; empty without [sweep]

    def resolved(self) -> dict[str, Any]:
        """Every key with its value in force (defaults filled), as plain TOML-able data."""
        out = self.schema.model_dump(mode="json", exclude={"data", "tokenizer", "embedding", "runner", "models"})
        sections = {"data": self.data_source, "tokenizer": self.tokenizer, "embedding": self.embedding,
                    "runner": self.runner}
        for name, choice in sections.items():
            out[name] = _section_dict(getattr(self.schema, name), choice)
        for recipe in self.recipes.values():
            if recipe.settings is not None:
                for table in type(recipe.settings).model_fields:
                    value = getattr(recipe.settings, table)
                    out[table] = (_section_dict(value, value._choice) if isinstance(value, ComponentSection)
                                  else value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
        out["models"] = [
            {"label": m.label, "architecture": m.architecture, **({"recipe": m.recipe} if m.recipe else {}),
             **_settings_dict(choice)}
            for m, (_, choice) in zip(self.schema.models, self.models, strict=True)
        ]
        if self.sweep is not None:
            out["sweep"] = self.sweep.to_toml()
        return _drop_none(out)

    def variant_configs(self) -> list[tuple[str, ExperimentConfig]]:
        """(variant name, its config) for a sweep; [("", self)] for a file without [sweep]."""
        return [(v.name, v.config) for v in self.variants] or [("", self)]

    def resolved_toml(self) -> str:
        return tomli_w.dumps(self.resolved())


@dataclass(frozen=True)
class Sweep:
    """A `[sweep]` table: dotted keys → value lists, run as their Cartesian product."""

    keys: list[str]
    values: list[list[Any]]
    labels: list[str] | None  # given names, one per combination in product order

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination as {dotted key: value}; the first key varies slowest."""
        return [dict(zip(self.keys, combo, strict=True)) for combo in itertools.product(*self.values)]

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = dict(zip(self.keys, self.values, strict=True))
        return {**table, "labels": self.labels} if self.labels else table


@dataclass
class Variant:
    """One sweep combination: its name (used in unit ids), the keys it sets, and its validated config."""

    name: str
    changes: dict[str, Any]
    config: ExperimentConfig


def _settings_dict(choice: Choice | None) -> dict[str, Any]:
    return choice.settings.model_dump(mode="json") if choice is not None and choice.settings is not None else {}


def _section_dict(section: BaseModel, choice: Choice | None) -> dict[str, Any]:
    """A component-naming table as written back: its own keys, then the component's validated settings."""
    core = section.model_dump(mode="json", exclude=set(section.model_extra or {}))
    return {**core, **_settings_dict(choice)}


def _drop_none(value: Any) -> Any:
    """TOML has no null: a None default is written by leaving the key out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ConfigError(f"{path}: cannot read experiment file ({error.strerror or error})") from None
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: file is {size:,} bytes; experiment files are limited to 1 MiB")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError:  # before ValueError, its base class
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except ValueError:  # int() refuses more than 4300 digits
        raise ConfigError(f"{path}: invalid TOML: an integer with thousands of digits; TOML integers "
                          f"are 64-bit") from None
    except OSError as error:  # a folder, no read permission, an I/O error
        raise ConfigError(f"{path}: cannot read experiment file ({error.strerror or error})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nesting too deep (limit {MAX_DEPTH} levels)") from None
    _check_depth(path, data, 0)
    return data


def _check_depth(path: Path, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ConfigError(f"{path}: nesting too deep (limit {MAX_DEPTH} levels)")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _check_depth(path, child, depth + 1)


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


# Location parts pydantic adds for the members of a union (`int | "auto"`): not keys a user wrote.
_UNION_MEMBER = re.compile(r"^(int|float|str|bool|none|constrained-\w+|.*\[.*\])$")


def _key_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_MEMBER.match(p)))


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _allowed_range(model: Any, loc: tuple[Any, ...]) -> str | None:
    """The range of a field at `loc` that declares both a lower and an upper bound, as in
    "between 1 and 1,024", so an error states what is allowed and not only the bound crossed."""
    info = None
    for part in loc:
        if isinstance(part, int):  # an element of a list of models: `models.0.…`
            model = (getattr(model, "__args__", None) or (None,))[0]
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    if info is None:
        return None
    limits = {name: getattr(m, name) for m in info.metadata for name in _SYMBOLS
              if getattr(m, name, None) is not None}
    low = next((name for name in ("ge", "gt") if name in limits), None)
    high = next((name for name in ("le", "lt") if name in limits), None)
    if low is None or high is None:
        return None
    if (low, high) == ("ge", "le"):
        return f"between {limits['ge']:,} and {limits['le']:,}"
    return f"{_SYMBOLS[low]} {limits[low]:,} and {_SYMBOLS[high]} {limits[high]:,}"


def _format_error(path: Path, error: ValidationError, prefix: str, valid: list[str],
                  model: type[BaseModel]) -> ConfigError:
    errors = error.errors()
    first = errors[0]
    loc = _key_loc(first["loc"])
    same_key = [e for e in errors if _key_loc(e["loc"]) == loc]  # one per union member
    key = ".".join(str(p) for p in (prefix, *loc) if str(p) != "")
    others = len(errors) - len(same_key)
    more = f" (+{others} more)" if others else ""
    if first["type"] == "extra_forbidden":
        leaf = str(first["loc"][-1])
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
        return ConfigError(f"{path}: {key}: unknown key{hint}{more}")
    value = first.get("input")
    text = repr(value)
    shown = f" (got {text if len(text) <= 80 else text[:77] + '…'})" if not isinstance(value, dict) else ""
    message = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_key))
    allowed = _allowed_range(model, loc) if first["type"] in _BOUND_ERRORS else None
    if allowed is not None:
        message = f"must be {allowed}"
    return ConfigError(f"{path}: {key}: {message}{shown}{more}")


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that a validation error location points into."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or str(part) not in fields:
            break
        annotation = fields[str(part)].annotation
        current = getattr(annotation, "__args__", (annotation,))[0] if str(part) == "models" else annotation
    return list(getattr(current, "model_fields", {}).keys())


def _choose(path: Path, registry: Registry, kind: str, key: str, name: str, section: BaseModel,
            core: set[str]) -> Choice:
    component = registry.get(kind, name, where=f"{path}: {key}")
    extra = dict(section.model_extra or {})
    if component.settings is None:
        if extra:
            bad = sorted(extra)[0]
            raise ConfigError(f"{path}: {key}.{bad}: unknown key ({kind} {name!r} takes no settings)")
        return Choice(key, component, None, f"{path}: {key}")
    try:
        settings = component.settings.model_validate(extra)
    except ValidationError as error:
        valid = sorted(set(component.settings.model_fields) | core)
        raise _format_error(path, error, key, valid, component.settings) from None
    return Choice(key, component, settings, f"{path}: {key}")


def load_config(path: Path, registry: Registry, overrides: list[str] | None = None) -> ExperimentConfig:
    """The validated experiment; with a `[sweep]`, every variant is validated too, before anything runs."""
    overrides = list(overrides or [])
    data = read_toml(path)
    for text in overrides:
        apply_override(data, text)
    sweep = parse_sweep(path, data.pop("sweep", None), overrides)
    config = _validated(path, registry, data, overrides)
    if sweep is None:
        return config
    config.sweep = sweep
    names = sweep.labels or variant_names(sweep)
    for name, changes in zip(names, sweep.combinations(), strict=True):
        variant = copy.deepcopy(data)
        for key, value in changes.items():
            set_key(variant, key.split("."), value, f"{path}: sweep.{key}")
        try:
            config.variants.append(Variant(name, changes, _validated(path, registry, variant, overrides)))
        except ConfigError as error:
            raise ConfigError(f"{error} (in sweep variant {name!r})") from None
    return config


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


def _validated(path: Path, registry: Registry, data: dict[str, Any], overrides: list[str]) -> ExperimentConfig:
    _check_numbers(path, data, "")
    tables = {key: data[key] for key in data if key not in FileSchema.model_fields}  # the recipes' tables
    try:
        schema = FileSchema.model_validate({k: v for k, v in data.items() if k not in tables})
    except ValidationError as error:
        loc = error.errors()[0]["loc"]
        valid = _valid_keys(FileSchema, loc) + (["sweep"] if len(loc) == 1 else [])
        raise _format_error(path, error, "", valid, FileSchema) from None

    def core(model: type[BaseModel]) -> set[str]:
        return set(model.model_fields)

    models = []
    labels: set[str] = set()
    for index, model in enumerate(schema.models):
        if model.label in labels:
            raise ConfigError(f"{path}: models.{index}.label: duplicate label {model.label!r}")
        labels.add(model.label)
        choice = _choose(path, registry, "architecture", f"models.{index}", model.architecture, model,
                         core(ModelSection))
        models.append((model.label, choice))
    metrics = [
        Choice(f"experiment.metrics.{i}", registry.get("metric", name, where=f"{path}: experiment.metrics"),
               None, f"{path}: experiment.metrics.{i}")
        for i, name in enumerate(schema.experiment.metrics)
    ]
    for choice in metrics:
        if choice.component.settings is not None:
            choice.settings = choice.component.settings()
    model_recipes = [model.recipe or _default_recipe(path, index, choice)
                     for index, (model, (_, choice)) in enumerate(zip(schema.models, models, strict=True))]
    config = ExperimentConfig(
        path=path,
        schema=schema,
        data_source=_choose(path, registry, "data_source", "data", schema.data.source, schema.data,
                            core(DataSection)),
        tokenizer=_choose(path, registry, "tokenizer", "tokenizer", schema.tokenizer.name, schema.tokenizer,
                          core(TokenizerSection)),
        embedding=_choose(path, registry, "embedding", "embedding", schema.embedding.source,
                          schema.embedding, core(EmbeddingSection)),
        runner=_choose(path, registry, "runner", "runner", schema.runner.name, schema.runner,
                       core(RunnerSection)),
        models=models,
        metrics=metrics,
        recipes=_recipes(path, registry, model_recipes, tables),
        model_recipes=model_recipes,
        overrides=overrides,
    )
    _check_components(config)
    return config


def _default_recipe(path: Path, index: int, architecture: Choice) -> str:
    """The recipe an architecture names for itself (`default_recipe`)."""
    recipe = getattr(architecture.build(), "default_recipe", None)
    if not isinstance(recipe, str) or not recipe:
        c = architecture.component
        raise PluginError(f"{path}: models.{index}: plugin {c.plugin!r}: architecture {c.name!r} names no "
                          f"default_recipe; set models.{index}.recipe (e.g. \"lm\") or fix the plugin")
    return recipe


def _recipes(path: Path, registry: Registry, names: list[str], tables: dict[str, Any]) -> dict[str, Choice]:
    """Each recipe in use with its settings validated from the top-level tables it owns; a table no recipe
    in use owns is an error that says which recipe would read it."""
    recipes: dict[str, Choice] = {}
    for index, name in enumerate(names):
        if name in recipes:
            continue
        component = registry.get("recipe", name, where=f"{path}: models.{index}.recipe")
        owned = list(component.settings.model_fields) if component.settings is not None else []
        settings = None
        if component.settings is not None:
            try:
                settings = component.settings.model_validate({k: v for k, v in tables.items() if k in owned})
            except ValidationError as error:
                loc = error.errors()[0]["loc"]
                raise _format_error(path, error, "", _valid_keys(component.settings, loc), component.settings) from None
            for table in owned:
                section = getattr(settings, table)
                if isinstance(section, ComponentSection):
                    section._choice = _choose(path, registry, section.kind, table, section.name, section,
                                              set(type(section).model_fields))
                    section._choice.protocol = type(section).protocol
        recipes[name] = Choice(f"recipe {name}", component, settings, f"{path}: recipe {name!r}")
    owned_now = {table for c in recipes.values() if c.settings is not None for table in type(c.settings).model_fields}
    for table in tables:
        if table in owned_now:
            continue
        owners = [c.name for c in registry.components["recipe"].values()
                  if c.settings is not None and table in c.settings.model_fields]
        if owners:
            raise ConfigError(f"{path}: {table}: this table belongs to recipe {owners[0]!r}, which no model uses "
                              f"(recipes in use: {', '.join(recipes)}); remove it or add a model trained by "
                              f"{owners[0]!r}")
        valid = sorted(set(FileSchema.model_fields) | owned_now | {"sweep"})
        close = difflib.get_close_matches(table, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"{path}: {table}: unknown key{hint}")
    return recipes


def _check_components(config: ExperimentConfig) -> None:
    """Build every component and check it against its protocol, so `validate` catches a factory that
    returns the wrong kind of object before any training. Runners are only checked by class: building
    one may read torchrun's environment or touch CUDA. Models are built on the meta device (no memory)
    and checked against the core's contract and their recipe's (`model_protocol`, where it names one)."""
    if isinstance(config.runner.component.factory, type):
        config.runner.require(config.runner.component.factory, PROTOCOLS["runner"], "is")
    tokenizer = config.tokenizer.build()
    for choice in (config.data_source, config.embedding, *config.metrics):
        choice.build()
    recipes = {name: choice.build() for name, choice in config.recipes.items()}
    for recipe in config.recipes.values():
        for table in type(recipe.settings).model_fields if recipe.settings is not None else ():
            section = getattr(recipe.settings, table)
            if isinstance(section, ComponentSection):
                section.build()
    declared = getattr(tokenizer, "expected_vocab_size", None)
    vocab_size = declared if isinstance(declared, int) and declared >= 1 else 256
    for (label, choice), recipe_name in zip(config.models, config.model_recipes, strict=True):
        architecture = choice.build()
        try:
            with torch.device("meta"):
                model = architecture.build(vocab_size)
        except Exception:  # an architecture that needs real tensors to build is checked when a run builds it
            continue
        choice.require(model, LanguageModel, "builds")
        wanted = getattr(recipes[recipe_name], "model_protocol", None)
        if isinstance(wanted, type):
            index = config.models.index((label, choice))
            choice.require(model, wanted, f"builds (for recipe {recipe_name!r})",
                           f"set models.{index}.recipe to a recipe this architecture supports (its default: "
                           f"{architecture.default_recipe!r}), or choose another architecture")


def _check_numbers(path: Path, value: Any, key: str) -> None:
    """Plugin settings may accept plain floats and ints: NaN and inf are never meaningful in an
    experiment, and an integer beyond 64 bits (which TOML forbids) would overflow in torch or numpy."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {key}: non-finite value {value!r}; use a finite number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise ConfigError(f"{path}: {key}: integer outside the 64-bit range TOML allows "
                          f"(-2**63 … 2**63-1); use a smaller number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(path, v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(path, v, f"{key}.{i}")
