"""What a run can refuse before it reads any data: checked by `run` before it creates the run
directory, and by `validate`, with one implementation.

Two kinds of problem are found here: a split that cannot work whatever the corpus holds (training rows
that overlap the validation rows, a tokenizer trained on validation rows) and a component that cannot
load on this machine, where finding out is cheap and downloads nothing: the optional `check()` of the
data source, the tokenizer, the embedding (a local path that does not exist, a hub download while
offline) and each tracker in `[tracking] backends` (its package not installed). Every problem is named in
one message, so a user fixes them all in one try.
"""

from __future__ import annotations

from typing import Any

from .config import ExperimentConfig
from .corpus import Split, check_tokenizer_rows
from .errors import DataError, UserError

COMPONENTS = ("data_source", "tokenizer", "embedding")  # the ExperimentConfig choices that load files


def _split_problems(config: ExperimentConfig) -> list[str]:
    schema = config.schema
    val, dev = schema.data.val, schema.data.dev
    split = Split.of(schema.data.train_start, max(schema.experiment.samples), val.start, val.count,
                     None if dev is None else (dev.start, dev.count))
    found = []
    for check in (lambda: split.check(None),
                  lambda: _tokenizer_rows(config.tokenizer.build(), split)):
        try:
            check()
        except DataError as error:
            found.append(str(error))
    return found


def _tokenizer_rows(factory: Any, split: Split) -> None:
    rows = getattr(factory, "train_rows", None)
    if isinstance(rows, range):
        check_tokenizer_rows(rows, split.val, None)
        if split.dev is not None:
            check_tokenizer_rows(rows, split.dev, None, "development")


def _component_problems(config: ExperimentConfig) -> list[str]:
    """The DataError each component's `check()` raises, where it has one (a component without it is
    found out when the run loads it)."""
    found = []
    for attribute in COMPONENTS:
        check = getattr(getattr(config, attribute).build(), "check", None)
        if not callable(check):
            continue
        try:
            check()
        except DataError as error:
            found.append(str(error))
    for index, name in enumerate(config.schema.tracking.backends):
        check = getattr(config.trackers[name].build(), "check", None)
        try:
            if callable(check):
                check()
        except UserError as error:
            found.append(f"tracking.backends.{index}: {error}")
    return found


def problems(config: ExperimentConfig) -> list[str]:
    """Every problem of `config` and of each sweep variant that shows before data is read, each once."""
    found: list[str] = []
    for _, variant in config.variant_configs():
        found += _split_problems(variant) + _component_problems(variant)
    return list(dict.fromkeys(found))


def check_before_data(config: ExperimentConfig) -> None:
    """One DataError naming every problem `problems` finds (exit 2), or nothing."""
    found = problems(config)
    if len(found) == 1:
        raise DataError(f"{config.path}: {found[0]}")
    if found:
        listed = "; ".join(f"({i}) {text}" for i, text in enumerate(found, start=1))
        raise DataError(f"{config.path}: {len(found)} problems, fix them all before running: {listed}")
