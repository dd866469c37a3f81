"""Parameter counts and weight sizes per model, from the architecture itself, without allocating weights."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cuda
from .config import Choice, ExperimentConfig
from .errors import ConfigError

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


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
    """Per model: its `param_counts()` parts (with "total") and, under "trainable", what each of its
    `param_groups()` trains (a frozen embedding table counts in its part but in no group).

    Counted after the calls a run makes: `build`, then `set_embedding` with `[embedding] freeze`, so a
    model that keeps its table frozen until `set_embedding` says otherwise is counted as it trains. The
    table passed is an empty one of the model's own shape: no embedding is downloaded or loaded."""
    vocab_size = vocab_size_of(config)
    rows = []
    for label, choice in config.models:
        with torch.device("meta"):
            model = choice.build().build(vocab_size)
            table, _ = model.output_head()
            model.set_embedding(torch.empty_like(table), freeze=config.schema.embedding.freeze)
        counts = {k: int(v) for k, v in model.param_counts().items()}
        trainable = {group: sum(p.numel() for p in params if p.requires_grad)
                     for group, params in model.param_groups().items()}
        rows.append({"label": label, **counts, "trainable": trainable})
    return rows


def load_table(table: torch.Tensor, weight: torch.Tensor, trainable: bool) -> None:
    """Copy a [V, E] token table (GPT-2 wte, a seeded random one) into a model's embedding parameter, and
    let it train or not: what every architecture's `set_embedding` does. A table of another shape is a
    ValueError naming both shapes."""
    if tuple(weight.shape) != tuple(table.shape):
        raise ValueError(f"embedding table has shape {tuple(weight.shape)}; this model needs "
                         f"{tuple(table.shape)} (vocab_size, embedding width)")
    with torch.no_grad():
        table.copy_(weight)
    table.requires_grad_(trainable)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers; works on the meta device, where nothing is allocated."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _cpu_available() -> int | None:
    """MemAvailable, or the cgroup's remaining limit when that is lower (containers)."""
    found = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or no cgroup v2: whatever was read still counts
    return min(found) if found else None


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can still get, or None where that is unknown."""
    if device.type == "cuda":
        return int(cuda.backend().mem_get_info(device)[0])
    return _cpu_available() if device.type == "cpu" else None


def human_bytes(size: int) -> str:
    value, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"


def require_memory(needed: int, device: torch.device, what: str, lower: str) -> None:
    """A one-line ConfigError, before anything is allocated, when `needed` bytes exceed what `device` has.

    Allocating first would not fail cleanly: Linux overcommits, so a CPU model slightly too large
    is killed while its weights are initialised, and an absurd one raises from deep inside torch.
    """
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(f"{what} need {needed:,} bytes ({human_bytes(needed)}) but {device} has {free:,} bytes "
                          f"({human_bytes(free)}) available; lower {lower}")


def _size_keys(choice: Choice, index: int) -> str:
    """The two largest integer settings of a model: the keys most likely to shrink it."""
    values = choice.settings.model_dump() if choice.settings is not None else {}
    sizes = sorted(((v, k) for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)),
                   reverse=True)
    named = [f"models.{index}.{k} ({v:,})" for v, k in sizes[:2]]
    return " or ".join(named) or f"the widths or layer count of models.{index}"


def check_model_fits(config: ExperimentConfig, index: int, vocab_size: int, device: torch.device) -> None:
    """Refuse model `index` when its weights alone exceed the free memory of the CPU (where it is built)
    or of `device` (where it runs), naming the bytes needed and the keys to lower."""
    label, choice = config.models[index]
    with torch.device("meta"):
        needed = weight_bytes(choice.build().build(vocab_size))
    what = f"{config.path}: models.{index} ({label!r}): its weights alone"
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):
        require_memory(needed, where, what, _size_keys(choice, index))
