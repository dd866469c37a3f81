"""What a checkpoint of the shared epoch loop holds (`TrainState`), and the checks that let a resume
trust it.

A checkpoint may come from someone else or be damaged on disk, so nothing in it is used before it
is checked: `TrainState.from_checkpoint` refuses what `to_checkpoint` cannot have written (a missing
key, a wrong type, a negative count), and `TrainState.check_resume` refuses what does not continue
this configuration (an epoch beyond the configured epochs, weights of another shape, an optimizer
state the first step would fail on). Both raise ValueError naming the field, which a recipe's
checkpoint check passes on: the core then reports the checkpoint as damaged and the unit starts over.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from . import cuda
from .protocols import EvalOutputs

HISTORY_KEYS = {"epoch", "train_loss", "train_ppl", "val_loss", "val_ppl", "val_acc", "seconds"}


def _int(data: dict[str, Any], key: str, low: int = 0) -> int:
    value = _get(data, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{key} = {value!r} is not an integer ≥ {low}")
    return value


def _float(data: dict[str, Any], key: str, *, low: float = -math.inf, finite: bool = True) -> float:
    value = _get(data, key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= low \
            or (finite and not math.isfinite(value)):
        raise ValueError(f"{key} = {value!r} is not a {'finite ' if finite else ''}number ≥ {low}")
    return float(value)


def _get(data: dict[str, Any], key: str) -> Any:
    if key not in data:
        raise ValueError(f"{key} is missing")
    return data[key]


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _history(value: Any) -> list[dict[str, Any]]:
    """One row per epoch as `train_epochs` writes it (a non-finite number may have been written as null)."""
    if not isinstance(value, list):
        raise ValueError("history is not a list")
    rows = []
    for number, row in enumerate(value, start=1):
        row = _object(row, f"history[{number - 1}]")
        if set(row) != HISTORY_KEYS or row["epoch"] != number \
                or not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in row.values()):
            raise ValueError(f"history[{number - 1}] is not epoch {number}'s row")
        rows.append(dict(row))
    return rows


NOT_JSON = ("extras", "documents")  # EvalOutputs fields outside the JSON state (documents: a tensor)


def _best_val(value: Any) -> EvalOutputs | None:
    if value is None:
        return None
    data = _object(value, "best_val")
    if set(data) != {f.name for f in fields(EvalOutputs)} - set(NOT_JSON):
        raise ValueError("best_val does not hold nll_sum, correct, count and seed")
    return EvalOutputs(nll_sum=_float(data, "nll_sum", low=0), correct=_int(data, "correct"),
                       count=_int(data, "count", 1), seed=_int(data, "seed", -2**63))


def _optimizer(data: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer's `state_dict()`: scalars from JSON, tensors from the `optimizer/<index>/<key>` group."""
    data = _object(data, "optimizer")
    groups, scalars = _get(data, "param_groups"), _object(_get(data, "state"), "optimizer.state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError("optimizer.param_groups is not a list of groups with params")
    state: dict[int, dict[str, Any]] = {}
    for index, entries in scalars.items():
        if not index.isdigit():
            raise ValueError(f"optimizer.state key {index!r} is not a parameter index")
        state[int(index)] = dict(_object(entries, f"optimizer.state[{index}]"))
    for name, value in tensors.items():
        if not name.startswith("optimizer/"):
            continue
        index, _, key = name.removeprefix("optimizer/").partition("/")
        if not index.isdigit() or not key:
            raise ValueError(f"tensor {name!r} names no parameter index and key")
        state.setdefault(int(index), {})[key] = value.cpu() if key == "step" else value
    return {"state": state, "param_groups": [dict(g) for g in groups]}


@dataclass
class TrainState:
    """What a checkpoint holds after a finished epoch: enough to continue bit-identically."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.inf
    counter: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    model: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable parameters only
    optimizer: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    best_val: EvalOutputs | None = None
    rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None  # this process's CUDA device, where CUDA was in use (dropout there)
    seconds: float = 0.0

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors for safetensors and the rest for JSON: a checkpoint holds data, never code."""
        tensors = {f"model/{k}": v for k, v in self.model.items()}
        tensors |= {f"best/{k}": v for k, v in self.best_weights.items()}
        if self.rng is not None:
            tensors["rng"] = self.rng
        if self.cuda_rng is not None:
            tensors["cuda_rng"] = self.cuda_rng
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in self.optimizer.get("state", {}).items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        best = None if self.best_val is None else {
            f.name: getattr(self.best_val, f.name) for f in fields(EvalOutputs) if f.name not in NOT_JSON}
        if self.best_val is not None and self.best_val.documents is not None:  # per-document sums: exact float64
            tensors["best_documents"] = torch.from_numpy(self.best_val.documents)
        data = {"epoch": self.epoch, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "counter": self.counter, "history": self.history, "seconds": self.seconds, "best_val": best,
                "optimizer": {"param_groups": self.optimizer.get("param_groups", []), "state": scalars}}
        return tensors, data

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], data: Any) -> TrainState:
        """The inverse of `to_checkpoint`; tensors may be on any device (the RNG state goes to the CPU,
        and so does Adam's step count, where the optimizer keeps it). Raises ValueError naming the field
        for anything `to_checkpoint` cannot have written."""
        data = _object(data, "the training state")
        unknown = sorted(k for k in tensors if k not in ("rng", "cuda_rng", "best_documents")
                         and not k.startswith(("model/", "best/", "optimizer/")))
        if unknown:
            raise ValueError(f"unknown tensor {unknown[0]!r}")

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        best_val = _best_val(_get(data, "best_val"))
        if best_val is not None and "best_documents" in tensors:
            best_val.documents = tensors["best_documents"].cpu().double().numpy()
        return cls(epoch=_int(data, "epoch"), best_epoch=_int(data, "best_epoch"),
                   best_val_loss=_float(data, "best_val_loss", finite=False), counter=_int(data, "counter"),
                   history=_history(_get(data, "history")), model=group("model/"),
                   optimizer=_optimizer(_get(data, "optimizer"), tensors), best_weights=group("best/"),
                   best_val=best_val,
                   rng=tensors["rng"].cpu() if "rng" in tensors else None,
                   cuda_rng=tensors["cuda_rng"].cpu() if "cuda_rng" in tensors else None,
                   seconds=_float(data, "seconds", low=0))

    def check_resume(self, module: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, *,
                     epochs: int, patience: int, restore_best: bool, saved_lr: bool = True) -> None:
        """Raise ValueError unless `train_epochs` can continue from here with these arguments as the run
        that wrote it would have: epochs and counters that the loop can have reached, this model's
        trained weights, an optimizer state that loads and steps, and generator states of this host.
        `saved_lr=False` where the recipe sets every group's learning rate before each step (a schedule)."""
        if not 1 <= self.epoch <= epochs:
            raise ValueError(f"epoch {self.epoch} is not within the configured 1 … {epochs} epochs")
        if not 1 <= self.best_epoch <= self.epoch or self.counter != self.epoch - self.best_epoch \
                or self.counter > patience:
            raise ValueError(f"best_epoch {self.best_epoch} and counter {self.counter} do not fit epoch {self.epoch} "
                             f"(patience {patience})")
        if len(self.history) != self.epoch:
            raise ValueError(f"history has {len(self.history)} rows for {self.epoch} epochs")
        best = self.best_val
        if best is None or not self.best_val_loss == self.history[self.best_epoch - 1]["val_loss"] \
                == best.nll_sum / best.count:
            raise ValueError("best_val_loss, best_val and the best epoch's history row disagree")
        names = {name: p for name, p in module.named_parameters() if any(p is q for q in params)}
        _check_weights("model", self.model, names)
        if restore_best:
            _check_weights("best_weights", self.best_weights, names)
        elif self.best_weights:
            raise ValueError("best_weights are saved, but the run does not restore the best epoch")
        _check_optimizer(self.optimizer, optimizer, saved_lr)
        _check_generator("rng", self.rng, torch.get_rng_state())
        gpu = cuda.backend()
        if self.cuda_rng is not None and gpu.is_available():
            _check_generator("cuda_rng", self.cuda_rng, gpu.get_rng_state())


def _check_weights(what: str, saved: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    if saved.keys() != params.keys():
        raise ValueError(f"{what} name other parameters than the model trains")
    for name, tensor in saved.items():
        p = params[name]
        if tensor.shape != p.shape or tensor.dtype != p.dtype:
            raise ValueError(f"{what} {name} {tuple(tensor.shape)} {tensor.dtype} does not fit the model's "
                             f"{tuple(p.shape)} {p.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} {name} holds NaN or infinite values")


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer, saved_lr: bool) -> None:
    """The saved groups hold this optimizer's settings, and the state survives what the first step does
    with it: loaded into a copy of the optimizer and stepped once with zero gradients, it must not fail
    or leave a NaN."""
    mine = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))  # tuples as JSON lists, as saved
    if len(saved["param_groups"]) != len(mine):
        raise ValueError(f"optimizer has {len(saved['param_groups'])} parameter groups, not {len(mine)}")
    for number, (theirs, ours) in enumerate(zip(saved["param_groups"], mine, strict=True)):
        for key in sorted(set(theirs) & set(ours) - ({"lr"} if not saved_lr else set())):
            if theirs[key] != ours[key]:
                raise ValueError(f"optimizer group {number}: {key} = {theirs[key]!r}, configured {ours[key]!r}")
        lr = theirs.get("lr")
        if not isinstance(lr, int | float) or isinstance(lr, bool) or not 0 <= lr < math.inf:
            raise ValueError(f"optimizer group {number}: lr = {lr!r} is not a finite number ≥ 0")
    probe = copy.deepcopy(optimizer)  # its own copies of the parameters: the model stays untouched
    try:
        probe.load_state_dict(copy.deepcopy(saved))
        trained = [p for group in probe.param_groups for p in group["params"]]
        for p in trained:
            p.grad = torch.zeros_like(p)
        probe.step()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # whatever the probe trips on, the real first step would too
        raise ValueError(f"the optimizer state does not load ({type(error).__name__}: {error})") from None
    values = [*trained, *(v for s in probe.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    if not all(bool(torch.isfinite(v).all()) for v in values if v.is_floating_point()):
        raise ValueError("the optimizer state holds NaN or infinite values")


def _check_generator(what: str, saved: torch.Tensor | None, current: torch.Tensor) -> None:
    if saved is None or saved.shape != current.shape or saved.dtype != current.dtype:
        raise ValueError(f"{what} is not a generator state of this host")
