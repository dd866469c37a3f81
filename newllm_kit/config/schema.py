"""What a validated experiment is: the core sections of an experiment file, the component each
section resolves to (`Choice`), and the `ExperimentConfig` (with its sweep and variants) that the
rest of the toolkit reads. Defaults reproduce the seed's v2 experiment.
"""

from __future__ import annotations

import itertools
import re
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ..errors import PluginError, UserError
from ..protocols import PROTOCOLS, missing_members, missing_methods
from ..registry import Component, is_plugin_error, one_line, signals_seen

TEXT_SCHEMES = ("first_turn", "first_turn_128", "all_turns", "all_turns_space_512")
# Experiment names and model labels become folder and file names in the run directory: matched
# with fullmatch (`$` would let a trailing newline through) and never containing '..'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# numpy seeds modulo 2**32: a larger seed would silently repeat a smaller one's numpy stream.
SEED_MAX = 2**32 - 1
# Documents and rows: far beyond any corpus, far below where row arithmetic overflows int64.
ROWS_MAX = 10**9


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
    keep_models: Literal["best", "final", "both", "none"] = Field(
        "best", description="Trained models kept per unit in models/<unit>/best and/or final: the weights the "
                            "validation numbers were computed with, those of the last epoch, both, or none.")

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


class DevRows(_Strict):
    start: int = Field(..., ge=0, le=ROWS_MAX, description="First development row of the corpus.")
    count: int = Field(..., ge=1, le=ROWS_MAX, description="Number of development rows.")


class DataSection(_Open):
    source: str = Field("ultrachat", description="Data-source plugin name.")
    text: Literal["first_turn", "first_turn_128", "all_turns", "all_turns_space_512"] = Field(
        "first_turn", description="Text scheme (spec §1.2): T2, T1, T3, T4."
    )
    train_start: int = Field(0, ge=0, le=ROWS_MAX, description="First training row; training = k rows from here.")
    val: ValRows = Field(default_factory=lambda: ValRows())
    dev: DevRows | None = Field(None, description="Development rows (disjoint from training and validation): "
                                "when set, every recipe early-stops on them and scores the validation rows once, "
                                "at the end; unset, early stopping reads the validation rows (the seed's protocol).")


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


class LauncherSection(_Open):
    name: str = Field("sequential", description="Launcher plugin name: sequential (this process), pool or slurm.")
    stale_after_s: float = Field(600.0, gt=0, description="A unit's claim whose heartbeat is older than this "
                                 "(seconds) is taken over: its process is gone.")


class TrackingSection(_Open):
    """`[tracking]`: the trackers that watch each unit; every other key is a `[tracking.NAME]` table of
    that tracker's settings."""

    backends: list[str] = Field([], description="Tracker plugins that log each unit: tensorboard, mlflow, wandb.")


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
    launcher: LauncherSection = Field(default_factory=lambda: LauncherSection())
    tracking: TrackingSection = Field(default_factory=lambda: TrackingSection())
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
        """The component's object, checked against its protocol before anything uses it. What the
        factory prints goes to stderr, so `--json` output stays one document."""
        c = self.component
        with redirect_stdout(sys.stderr), signals_seen() as seen:
            try:
                built = c.factory(self.settings)
            except UserError:
                raise
            except BaseException as error:  # a plugin's bug or sys.exit: name the plugin, keep the cause
                if not is_plugin_error(error, seen):
                    raise
                raise self.failed(f"building {c.kind.replace('_', ' ')} {c.name!r}", error) from error
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

    def failed(self, doing: str, error: BaseException) -> PluginError:
        """The one-line error for plugin code of this component that raised (or exited) while `doing`."""
        return PluginError(f"{self._prefix()}plugin {self.component.plugin!r}: {doing} failed: {one_line(error)}")

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
    launcher: Choice
    models: list[tuple[str, Choice]]
    metrics: list[Choice]
    recipes: dict[str, Choice] = field(default_factory=dict)  # by recipe name; settings: the tables it owns
    model_recipes: list[str] = field(default_factory=list)  # the recipe of each [[models]] entry
    overrides: list[str] = field(default_factory=list)
    sweep: Sweep | None = None
    variants: list[Variant] = field(default_factory=list)  # one per sweep combination; empty without [sweep]
    trackers: dict[str, Choice] = field(default_factory=dict)  # every [tracking.NAME] table and each backend

    def resolved(self) -> dict[str, Any]:
        """Every key with its value in force (defaults filled), as plain TOML-able data."""
        out = self.schema.model_dump(mode="json", exclude={"data", "tokenizer", "embedding", "runner", "launcher",
                                                           "tracking", "models"})
        sections = {"data": self.data_source, "tokenizer": self.tokenizer, "embedding": self.embedding,
                    "runner": self.runner, "launcher": self.launcher}
        for name, choice in sections.items():
            out[name] = _section_dict(getattr(self.schema, name), choice)
        out["tracking"] = {"backends": list(self.schema.tracking.backends),
                           **{name: _settings_dict(choice) for name, choice in self.trackers.items()
                              if choice.settings is not None}}
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
