"""`newllm-kit evaluate`: the configured metrics of kept models on another source, split or text scheme.

The validation stream is read by the unit's own config with `--set data.…` changes, tokenised by
the kept tokenizer (`--set tokenizer.…` only where it gives the same fingerprint), and scored by
the recipe's `evaluate`, the code of the run's own validation: with no changes, a kept best model
gives its record's numbers back. Each unit's result is a line of `evaluations/<name>.jsonl` in the
run directory, with the data's fingerprints.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .config import load_config
from .corpus import rows_stream
from .errors import DataError, RunFailed, UserError
from .experiment import check_outputs, metric_values
from .kept_models import KeptModel, kept_units, load_model, model_folder
from .progress import NullProgress
from .protocols import Saved, UnitContext, UnitData
from .registry import Registry
from .report import metric_key
from .rundir import RunDir
from .strict_json import json_text
from .training import ppl

EVALUATIONS_DIR = "evaluations"
CHANGEABLE = ("data.", "tokenizer.", "runner.")  # what data is scored and where; never the model


class NoCheckpoint:
    """Evaluation keeps no checkpoint: a recipe's `evaluate` that asks for one is told so."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a recipe's evaluate() may not use the unit's checkpoint (there is none)")

    def load(self, check: Any = None) -> Saved | None:
        return None

    save = file = write_stream = append = discard = model_state = _refuse


def evaluation_name(config: Any) -> str:
    """`<source>-<scheme>-<start>-<count>`: the default file name of an evaluation's results."""
    data = config.schema.data
    raw = f"{data.source}-{data.text}-{data.val.start}-{data.val.count}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:100]


def _check_overrides(overrides: list[str]) -> None:
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith(CHANGEABLE):
            raise UserError(f"--set {text}: evaluate changes only data.*, tokenizer.* and runner.* keys (what is "
                            f"scored and where); the model is evaluated as it was trained")


def _tokenizer(kept: KeptModel, config: Any, overrides: list[str]) -> Any:
    """The kept tokenizer; a `--set tokenizer.…` one only where its fingerprint is the model's."""
    if not any(o.split("=", 1)[0].strip().startswith("tokenizer.") for o in overrides):
        return kept.tokenizer
    with tempfile.TemporaryDirectory() as cache:
        rebuilt = config.tokenizer.build().load([], Path(cache))
    if rebuilt.fingerprint != kept.tokenizer.fingerprint:
        raise UserError(f"--set tokenizer.…: that tokenizer has fingerprint {rebuilt.fingerprint[:12]}…, the model "
                        f"was trained with {kept.tokenizer.fingerprint[:12]}…; a model is scored only with its own "
                        f"tokenizer, so drop the tokenizer override")
    return rebuilt


def evaluate_unit(run: RunDir, unit: str, which: str, overrides: list[str], registry: Registry,
                  name: str | None, say: Any) -> dict[str, Any]:
    """Score one unit's kept model and append its line to `evaluations/<name>.jsonl`."""
    config = load_config(model_folder(run.path, unit, which) / "config.toml", registry, overrides)
    runner = config.runner.build()  # `--set runner.…` says where it runs
    runner.setup()
    scratch = run.inside(run.path / EVALUATIONS_DIR / f".scratch-{unit}")
    try:
        kept = load_model(run.path, unit, which, registry, runner.device)
        evaluate = kept.require("evaluate", "evaluate")
        tokenizer = _tokenizer(kept, config, overrides)
        data = config.schema.data
        rows = range(data.val.start, data.val.start + data.val.count)
        source = config.data_source.build()
        stream = rows_stream(source, data.text, tokenizer, rows, run.path.parent / ".cache")
        if len(stream) < 2:
            raise DataError(f"data.val: rows {rows.start} … {rows.stop - 1} hold {len(stream)} token(s); need 2")
        record = kept.kept.record
        trained = range(data.train_start, data.train_start + int(record.get("samples", 0)))
        if source.fingerprint() == record.get("fingerprints", {}).get("corpus") and \
                rows.start < trained.stop and trained.start < rows.stop:
            say(f"warning: {unit}: rows {rows.start} … {rows.stop - 1} overlap the {len(trained)} documents it "
                f"was trained on; these numbers are not held-out")
        seed = int(record.get("seed", config.schema.experiment.seed))
        scratch.mkdir(parents=True, exist_ok=True)
        context = UnitContext(id=unit, seed=seed, runner=runner, progress=NullProgress(), checkpoint=NoCheckpoint(),
                              scratch=scratch, metrics=lambda outputs: metric_values(config, outputs))
        unit_data = UnitData(train_ids=torch.zeros(0, dtype=torch.int32, device=runner.device),
                             val_ids=stream.ids.to(runner.device), train_documents=np.zeros((0, 2), np.int64),
                             vocab_size=tokenizer.vocab_size, val_documents=stream.boundaries)
        outputs = evaluate(kept.model, unit_data, context, kept.kept)
        check_outputs(kept.recipe_name, outputs, len(stream), len(stream.boundaries))
        if outputs.count == 0:
            raise RunFailed(f"{unit}: recipe {kept.recipe_name!r} scored no validation position")
        outputs.seed = seed
        metrics = metric_values(config, outputs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        runner.teardown()
    line = {
        "evaluation": name or evaluation_name(config), "unit": unit, "weights": which,
        "model": record.get("model"), "samples": record.get("samples"), "seed": seed,
        "val_ppl": metrics.get("ppl", ppl(outputs.nll_sum / outputs.count)),
        "val_acc": metrics.get("accuracy", outputs.correct / outputs.count),
        **{metric_key(k): v for k, v in metrics.items()}, "metrics": metrics,
        "nll_sum": outputs.nll_sum, "correct": outputs.correct, "count": outputs.count, "val_tokens": len(stream),
        "data": {"source": data.source, "text": data.text, "rows": [rows.start, rows.stop],
                 "fingerprints": {"corpus": source.fingerprint(), "tokenizer": tokenizer.fingerprint,
                                  "val_ids": stream.sha256}},
        "overrides": overrides, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    file = run.inside(run.path / EVALUATIONS_DIR / f"{line['evaluation']}.jsonl")
    file.parent.mkdir(exist_ok=True)
    text = (json_text(line) + "\n").encode()

    def append(handle: BinaryIO) -> None:
        handle.write(text)

    run.append_stream(file, append)
    line["file"] = str(file)
    return line


def evaluate_run(run_path: Path, unit: str | None, which: str, overrides: list[str], registry: Registry,
                 name: str | None, say: Any) -> list[dict[str, Any]]:
    """`evaluate_unit` for `unit`, or for every unit with a kept model."""
    _check_overrides(overrides)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UserError(f"--name {name!r}: 1–100 letters, digits, '.', '_' or '-' (it names "
                        f"{EVALUATIONS_DIR}/<name>.jsonl)")
    run = RunDir.open(run_path)
    run.check_links()
    units = [unit] if unit is not None else kept_units(run.path)
    if not units:
        raise UserError(f"{run_path}: no kept models (models/ is empty); runs keep them unless "
                        f"experiment.keep_models = \"none\"")
    return [evaluate_unit(run, u, which, overrides, registry, name, say) for u in units]
