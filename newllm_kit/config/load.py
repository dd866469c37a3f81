"""`load_config`: a file, its `--set` overrides and its sweep into a validated `ExperimentConfig`.

Core keys are validated by the schema; every other key of a section by the settings model of the
component the section names, and every other top-level table by the recipe in use that owns it,
so a third-party plugin's keys are validated exactly like the built-ins'. Every component is then
built once and checked against its protocol, so `validate` catches a broken plugin before a run.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, PluginError
from ..protocols import PROTOCOLS, LanguageModel
from ..registry import Registry, is_plugin_error, signals_seen
from .messages import format_error, valid_keys
from .reading import apply_override, read_toml, set_key
from .schema import (
    Choice,
    ComponentSection,
    DataSection,
    EmbeddingSection,
    ExperimentConfig,
    FileSchema,
    LauncherSection,
    ModelSection,
    RunnerSection,
    TokenizerSection,
    TrackingSection,
    Variant,
)
from .sweeps import parse_sweep, variant_names

INT64 = (-(2**63), 2**63 - 1)  # TOML integers are 64-bit; tomllib accepts any size

Settings = TypeVar("Settings", bound=BaseModel)


def load_config(path: Path, registry: Registry, overrides: list[str] | None = None) -> ExperimentConfig:
    """The validated experiment; with a `[sweep]`, every variant is validated too, before anything runs.
    Components built to check them print to stderr: stdout is the command's (one document under `--json`)."""
    with redirect_stdout(sys.stderr):
        return _load(path, registry, overrides)


def _load(path: Path, registry: Registry, overrides: list[str] | None) -> ExperimentConfig:
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


def _validated(path: Path, registry: Registry, data: dict[str, Any], overrides: list[str]) -> ExperimentConfig:
    _check_values(path, data, "")
    tables = {key: data[key] for key in data if key not in FileSchema.model_fields}  # the recipes' tables
    try:
        schema = strict_validate(FileSchema, {k: v for k, v in data.items() if k not in tables})
    except ValidationError as error:
        loc = error.errors()[0]["loc"]
        valid = valid_keys(FileSchema, loc) + (["sweep"] if len(loc) == 1 else [])
        raise format_error(path, error, "", valid, FileSchema) from None

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
        launcher=_choose(path, registry, "launcher", "launcher", schema.launcher.name, schema.launcher,
                         core(LauncherSection)),
        models=models,
        metrics=metrics,
        recipes=_recipes(path, registry, model_recipes, tables),
        model_recipes=model_recipes,
        overrides=overrides,
        trackers=_trackers(path, registry, schema.tracking),
    )
    _check_components(config)
    return config


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
        settings = strict_validate(component.settings, extra)
    except ValidationError as error:
        valid = sorted(set(component.settings.model_fields) | core)
        raise format_error(path, error, key, valid, component.settings) from None
    return Choice(key, component, settings, f"{path}: {key}")


def _trackers(path: Path, registry: Registry, section: TrackingSection) -> dict[str, Choice]:
    """Each tracker in `backends` and each `[tracking.NAME]` table (a table may wait for its backend to be
    listed, e.g. by `--set`), its settings validated by the tracker's model: defaults where it has no table."""
    names, tables = list(section.backends), dict(section.model_extra or {})
    trackers: dict[str, Choice] = {}
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"{path}: tracking.backends.{index}: {name!r} is listed twice")
    for name in [*names, *(table for table in tables if table not in names)]:
        key = f"tracking.{name}"
        where = f"{path}: tracking.backends.{names.index(name)}" if name in names else f"{path}: {key}"
        table = tables.get(name, {})
        if not isinstance(table, dict):
            valid = ["backends", *sorted(registry.components.get("tracker", {}))]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{path}: {key}: unknown key; {hint} ([tracking.NAME] tables hold a tracker's settings)")
        component = registry.get("tracker", name, where=where)
        settings = None
        if component.settings is not None:
            try:
                settings = strict_validate(component.settings, table)
            except ValidationError as error:
                raise format_error(path, error, key, sorted(component.settings.model_fields),
                                   component.settings) from None
        elif table:
            raise ConfigError(f"{path}: {key}.{sorted(table)[0]}: unknown key (tracker {name!r} takes no settings)")
        trackers[name] = Choice(key, component, settings, f"{path}: {key}")
    return trackers


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
                settings = strict_validate(component.settings, {k: v for k, v in tables.items() if k in owned})
            except ValidationError as error:
                loc = error.errors()[0]["loc"]
                raise format_error(path, error, "", valid_keys(component.settings, loc), component.settings) from None
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
    for choice in (config.data_source, config.embedding, config.launcher, *config.metrics, *config.trackers.values()):
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
        with signals_seen() as seen:
            try:
                with torch.device("meta"):
                    model = architecture.build(vocab_size)
            except Exception:  # an architecture that needs real tensors to build is checked when a run builds it
                continue
            except BaseException as error:  # sys.exit: the plugin's error, never a silent exit
                if not is_plugin_error(error, seen):
                    raise
                raise choice.failed(f"building a model of architecture {choice.component.name!r}", error) from error
        choice.require(model, LanguageModel, "builds")
        wanted = getattr(recipes[recipe_name], "model_protocol", None)
        if isinstance(wanted, type):
            index = config.models.index((label, choice))
            choice.require(model, wanted, f"builds (for recipe {recipe_name!r})",
                           f"set models.{index}.recipe to a recipe this architecture supports (its default: "
                           f"{architecture.default_recipe!r}), or choose another architecture")


def strict_validate(model: type[Settings], data: dict[str, Any]) -> Settings:
    """`model` validated from TOML data by pydantic's strict rules for JSON: TOML has real booleans,
    integers and strings, so `seed = true`, `freeze = "no"` or `samples = ["40"]` is a mistake to report,
    never a value to convert (to 1, False, [40]). An integer where a float is expected stays a number
    (`learning_rate = 1`), and arrays fill tuples and strings fill paths and enums, as they would from
    JSON. Applies to the core's sections and to every plugin's settings model alike."""
    return model.model_validate_json(json.dumps(data), strict=True)


def _check_values(path: Path, value: Any, key: str) -> None:
    """Plugin settings may accept plain floats and ints: NaN and inf are never meaningful in an
    experiment, and an integer beyond 64 bits (which TOML forbids) would overflow in torch or numpy.
    No setting takes a TOML date or time, and strict validation reads values as JSON has them."""
    if isinstance(value, datetime.date | datetime.time):
        raise ConfigError(f"{path}: {key}: a TOML date or time ({value.isoformat()}) is not a setting's "
                          f"value; quote it if you mean the text")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {key}: non-finite value {value!r}; use a finite number")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise ConfigError(f"{path}: {key}: integer outside the 64-bit range TOML allows "
                          f"(-2**63 … 2**63-1); use a smaller number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_values(path, v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(path, v, f"{key}.{i}")
