"""Experiment files: TOML -> validated, typed config, with `--set` overrides and provenance.

Core keys live in the section models of `schema`; every other key of a section belongs to the
component the section names (`[data] source = "ultrachat"` → that data source's settings model),
so a third-party plugin's keys are validated exactly like the built-ins'. Every other top-level
table belongs to a recipe in use (`[solver]` and `[phase2]` to cvfp, `[lm]` to lm) and is
validated by that recipe's settings model.

`reading` turns a file and its overrides into plain data, `sweeps` reads `[sweep]`, `load`
validates everything against the schema and the registry, and `messages` words what it rejects.
"""

from __future__ import annotations

from .load import INT64, load_config
from .reading import MAX_DEPTH, MAX_FILE_BYTES, apply_override, parse_override, read_toml, set_key
from .schema import (
    NAME_PATTERN,
    ROWS_MAX,
    SEED_MAX,
    TEXT_SCHEMES,
    Choice,
    ComponentSection,
    DataSection,
    EmbeddingSection,
    ExperimentConfig,
    ExperimentSection,
    FileSchema,
    ModelSection,
    RunnerSection,
    Sweep,
    TokenizerSection,
    ValRows,
    Variant,
    safe_name,
)
from .sweeps import parse_sweep, variant_names

__all__ = [
    "INT64",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "NAME_PATTERN",
    "ROWS_MAX",
    "SEED_MAX",
    "TEXT_SCHEMES",
    "Choice",
    "ComponentSection",
    "DataSection",
    "EmbeddingSection",
    "ExperimentConfig",
    "ExperimentSection",
    "FileSchema",
    "ModelSection",
    "RunnerSection",
    "Sweep",
    "TokenizerSection",
    "ValRows",
    "Variant",
    "apply_override",
    "load_config",
    "parse_override",
    "parse_sweep",
    "read_toml",
    "safe_name",
    "set_key",
    "variant_names",
]
