"""Parameter counts per model, from the architecture itself, without allocating weights."""

from __future__ import annotations

from typing import Any

import torch

from .config import ExperimentConfig
from .errors import ConfigError


def vocab_size_of(config: ExperimentConfig) -> int:
    """The vocabulary size a tokenizer declares up front (no data or download needed)."""
    factory = config.tokenizer.build()
    size = getattr(factory, "expected_vocab_size", None)
    if not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"{config.path}: tokenizer {config.tokenizer.component.name!r} does not declare its vocabulary size "
            f"before training; parameter counts need one (set it in [tokenizer] if the plugin allows)"
        )
    return size


def count_params(config: ExperimentConfig) -> list[dict[str, Any]]:
    vocab_size = vocab_size_of(config)
    rows = []
    for label, choice in config.models:
        with torch.device("meta"):
            model = choice.build().build(vocab_size)
        if config.schema.embedding.freeze:
            table, _ = model.output_head()
            model.set_embedding(torch.empty_like(table), freeze=True)
        counts = model.param_counts()
        trainable = {phase: sum(p.numel() for p in params) for phase, params in model.param_groups().items()}
        rows.append({"label": label, **{k: int(counts[k]) for k in ("context_block", "token_block", "embedding",
                                                                    "head", "total")},
                     "trainable": {"phase1": trainable["phase1"], "phase2": trainable["phase2"]}})
    return rows
