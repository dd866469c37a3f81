"""Trained models that outlive the run: `models/<unit>/best/` and `models/<unit>/final/`.

A kept model is data only, loadable on any device without the run's process: `model.safetensors`
(every weight once: tensors that share memory, such as a head tied to the embedding table, are
stored under their first name and the tie is recorded in the file's metadata; the recipe's own
tensors under "kept/"), `config.json` (architecture, its settings, vocabulary size, recipe, the
embedding's provenance, the tokenizer's fingerprint), `config.toml` (the unit's resolved
experiment, which rebuilds it through the same plugins), `tokenizer.json` where the tokenizer
serialises itself, `metrics.json` (the unit's record) and a `README.md` card. A folder is written
whole under a hidden name and renamed into place, as checkpoints are.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .config import ExperimentConfig, load_config
from .errors import DataError, UserError
from .protocols import Kept, RecipeResult, Tokenizer
from .registry import Registry
from .rundir import RunDir, plain_name
from .strict_json import json_text

MODELS_DIR = "models"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
KEPT_PREFIX = "kept/"  # the recipe's tensors inside model.safetensors
CHOICES = {"best": ("best",), "final": ("final",), "both": ("best", "final"), "none": ()}


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once, under the first name it appears with, and {other name: that name}
    for the names that alias it (same storage, offset, shape and strides: a tied head)."""
    first: dict[tuple[Any, ...], str] = {}
    unique, ties = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor.device)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, ties


@dataclass(frozen=True)
class KeptFiles:
    """What `save_model` writes besides the weights: the unit's config, identity and numbers."""

    config: ExperimentConfig  # the unit's (its variant's, with its seed)
    model_index: int  # its [[models]] entry
    recipe: str
    tokenizer: Tokenizer
    record: dict[str, Any]


def save_model(run: RunDir, unit: str, which: str, model: nn.Module, kept_tensors: dict[str, torch.Tensor],
               files: KeptFiles) -> Path:
    """Publish `models/<unit>/<which>/` atomically (a complete hidden folder, then a rename) and return it."""
    parent = run.unit_folder(MODELS_DIR, unit)
    final = run.inside(parent / which)
    state, ties = unique_tensors(model.state_dict())
    tensors = {**state, **{KEPT_PREFIX + k: v.detach().contiguous().cpu() for k, v in kept_tensors.items()}}
    label, choice = files.config.models[files.model_index]
    description = {
        "format": "newllm-kit kept model 1",
        "unit": unit, "which": which, "label": label, "architecture": choice.component.name,
        "settings": choice.settings.model_dump(mode="json") if choice.settings is not None else {},
        "vocab_size": int(getattr(model, "vocab_size")),  # noqa: B009 - the LanguageModel contract's member
        "embedding_dim": int(getattr(model, "embedding_dim")),  # noqa: B009
        "recipe": files.recipe, "tokenizer": {"name": files.config.tokenizer.component.name,
                                              "fingerprint": files.tokenizer.fingerprint},
        "embedding": files.record.get("embedding"), "ties": ties, "kept_tensors": sorted(kept_tensors),
        "resolved_config": files.config.resolved(),
    }
    serialise = getattr(files.tokenizer, "serialise", None)
    written = {
        WEIGHTS: save(tensors, metadata={"ties": json.dumps(ties)}),
        "config.json": (json_text(description, indent=2) + "\n").encode(),
        "config.toml": files.config.resolved_toml().encode(),
        "metrics.json": (json_text(files.record, indent=2) + "\n").encode(),
        **({TOKENIZER: str(serialise()).encode()} if callable(serialise) else {}),
        "README.md": card(description, files.record).encode(),
    }
    run.publish_folder(final, written)
    return final


def card(description: dict[str, Any], record: dict[str, Any]) -> str:
    """The model folder's README.md: what was trained on what, and its numbers."""
    tokenizer, embedding = description["tokenizer"], description.get("embedding") or {}
    corpus = str(record.get("fingerprints", {}).get("corpus", "?"))
    settings = ", ".join(f"{k} = {v}" for k, v in description["settings"].items() if v is not None)
    numbers = [f"| {name} | {value:.6g} |" for name, value in record.get("metrics", {}).items()
               if isinstance(value, int | float)]
    return "\n".join([
        f"# {description['unit']} ({description['which']} weights)",
        "",
        f"A `{description['architecture']}` model ({settings}) trained by the `{description['recipe']}` recipe "
        f"with newllm-kit on {record.get('train_tokens', 0):,} tokens ({record.get('samples', '?')} documents) of "
        f"data source `{description['resolved_config']['data']['source']}`, seed {record.get('seed', '?')}.",
        "",
        f"| validation ({record.get('val_tokens', 0):,} tokens) | value |",
        "|---|---|",
        *numbers,
        "",
        f"Tokenizer `{tokenizer['name']}` (fingerprint {tokenizer['fingerprint'][:16]}…), embedding "
        f"`{embedding.get('source', '?')}` (sha256 {str(embedding.get('sha256', '?'))[:16]}…), corpus "
        f"fingerprint {corpus[:16]}….",
        "",
        "The validation numbers are the run's, computed with the best epoch's weights. Sample, evaluate and "
        "export with `newllm-kit sample`, `evaluate` and `export` (README, \"After a run\").",
        "",
    ])


def kept_units(run_path: Path) -> list[str]:
    """Units of the run directory with at least one kept model, in name order."""
    root = run_path / MODELS_DIR
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and any((p / w / WEIGHTS).is_file() for w in ("best", "final"))) if root.is_dir() else []


def model_folder(run_path: Path, unit: str | None, which: str) -> Path:
    """`models/<unit>/<which>/` of a run directory; `unit` None picks the only unit with a kept model."""
    if not (run_path / "config.resolved.toml").is_file():
        raise UserError(f"{run_path}: not a run directory (no config.resolved.toml); pass the folder "
                        f"`newllm-kit run` printed")
    units = kept_units(run_path)
    if not units:
        raise UserError(f"{run_path}: no kept models (models/ is empty); runs keep them unless "
                        f"experiment.keep_models = \"none\", so run the experiment again (or continue it)")
    if unit is None:
        if len(units) > 1:
            raise UserError(f"{run_path} keeps models of {len(units)} units; choose one with --unit "
                            f"({', '.join(units[:8])}{' …' if len(units) > 8 else ''})")
        unit = units[0]
    if not plain_name(unit) or unit not in units:
        raise UserError(f"--unit {unit}: no kept model of that unit in {run_path}; kept: {', '.join(units[:8])}")
    folder = run_path / MODELS_DIR / unit / which
    if not (folder / WEIGHTS).is_file():
        there = [w for w in ("best", "final") if (folder.parent / w / WEIGHTS).is_file()]
        raise UserError(f"--weights {which}: {unit} keeps only its {' and '.join(there)} weights; "
                        f"choose --weights {there[0]}")
    return folder


@dataclass
class KeptModel:
    """A kept model loaded back: the model (eval mode, no gradients), its tokenizer, the unit's config,
    the recipe that trained it (which decodes and evaluates it) and what it kept."""

    folder: Path
    unit: str
    model: nn.Module
    tokenizer: Tokenizer
    config: ExperimentConfig
    recipe_name: str
    recipe: Any
    kept: Kept
    description: dict[str, Any]

    def require(self, member: str, command: str) -> Any:
        """The recipe's optional `member`, or a one-line error: this recipe cannot do `command`."""
        found = getattr(self.recipe, member, None)
        if not callable(found):
            raise UserError(f"{self.unit}: recipe {self.recipe_name!r} has no `{member}` method, so it cannot "
                            f"{command}; see docs/writing-plugins.md (\"Kept models\")")
        return found


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: unreadable ({error}); the kept model is damaged: run its unit again") from error
    if not isinstance(value, dict):
        raise DataError(f"{file}: not a JSON object; the kept model is damaged: run its unit again")
    return value


def read_weights(file: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a kept model's safetensors file, ties restored as shared tensors, and the ties."""
    try:
        with safe_open(file, framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            ties = json.loads((handle.metadata() or {}).get("ties", "{}"))
    except (OSError, ValueError, SafetensorError) as error:
        raise DataError(f"{file}: unreadable ({error}); the kept model is damaged: run its unit again") from error
    if not isinstance(ties, dict) or any(not isinstance(v, str) or v not in tensors for v in ties.values()):
        raise DataError(f"{file}: its recorded ties name tensors it does not hold; the kept model is damaged")
    return {**tensors, **{alias: tensors[name] for alias, name in ties.items()}}, ties


def load_model(run_path: Path, unit: str | None, which: str, registry: Registry,
               device: torch.device | str = "cpu") -> KeptModel:
    """Rebuild a kept model through its architecture plugin and load its weights, on `device`."""
    folder = model_folder(run_path, unit, which)
    description = _read_json(folder / "config.json")
    record = _read_json(folder / "metrics.json")
    config = load_config(folder / "config.toml", registry)
    labels = [label for label, _ in config.models]
    if description.get("label") not in labels:
        raise DataError(f"{folder / 'config.json'}: label {description.get('label')!r} is not a model of its "
                        f"config.toml; the kept model is damaged: run its unit again")
    index = labels.index(description["label"])
    tensors, _ = read_weights(folder / WEIGHTS, device)
    kept = {k.removeprefix(KEPT_PREFIX): v for k, v in tensors.items() if k.startswith(KEPT_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(KEPT_PREFIX)}
    with torch.device(device):
        model = config.models[index][1].build().build(int(description["vocab_size"]))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise DataError(f"{folder / WEIGHTS}: does not fit the {description.get('architecture')!r} model its "
                        f"config builds ({first[1].strip() if len(first) > 1 else first[0]}); run its unit "
                        f"again") from error
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(folder, config, description)
    recipe_name = str(description.get("recipe"))
    if recipe_name not in config.recipes:
        raise DataError(f"{folder / 'config.json'}: recipe {recipe_name!r} is not one of its config's; "
                        f"the kept model is damaged")
    return KeptModel(folder, folder.parent.name, model, tokenizer, config, recipe_name,
                     config.recipes[recipe_name].build(), Kept(kept, record), description)


class SerialisedTokenizer:
    """A tokenizer read back from the `tokenizers` JSON a kept model carries."""

    def __init__(self, text: str) -> None:
        from tokenizers import Tokenizer as Backend

        self._backend = Backend.from_str(text)
        self.vocab_size = int(self._backend.get_vocab_size(with_added_tokens=True))
        self.fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self._text = text

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def serialise(self) -> str:
        return self._text


def load_tokenizer(folder: Path, config: ExperimentConfig, description: dict[str, Any]) -> Tokenizer:
    """The kept tokenizer.json, or the tokenizer rebuilt from the config (one that trains nothing); either
    way checked against the fingerprint the model was trained with."""
    expected = (description.get("tokenizer") or {}).get("fingerprint")
    tokenizer: Tokenizer
    if (folder / TOKENIZER).is_file():
        try:
            tokenizer = SerialisedTokenizer((folder / TOKENIZER).read_text(encoding="utf-8"))
        except Exception as error:  # tokenizers raises its own Exception subclasses
            raise DataError(f"{folder / TOKENIZER}: unreadable ({str(error).splitlines()[0] if str(error) else error}"
                            f"); the kept model is damaged: run its unit again") from error
    else:
        with tempfile.TemporaryDirectory() as cache:
            tokenizer = config.tokenizer.build().load([], Path(cache))
    if tokenizer.fingerprint != expected:
        raise DataError(f"{folder}: the tokenizer {'in ' + TOKENIZER if (folder / TOKENIZER).is_file() else 'rebuilt'}"
                        f" has fingerprint {tokenizer.fingerprint[:12]}…, the model was trained with "
                        f"{str(expected)[:12]}…; its plugin must implement serialise() to be kept exactly")
    return tokenizer


def keep(run: RunDir, unit: str, choice: str, model: nn.Module, result: RecipeResult, files: KeptFiles,
         say: Callable[[str], None]) -> list[str]:
    """Write the unit's kept models as `experiment.keep_models` (`choice`) asks; returns which were kept.
    "best" is the model as the recipe returned it (the weights `val` was computed with); "final" puts
    the recipe's `final_weights` in first where it has them."""
    wanted = list(CHOICES[choice])
    if "best" in wanted and not result.ends_on_best:
        say(f"{unit}: the model ends on its last epoch's weights (nothing restored), not on the best epoch's "
            f"that the validation numbers are; kept as \"final\" only")
        wanted = ["final"]
    for which in wanted:
        if which == "final" and result.final_weights is not None:
            model.load_state_dict(result.final_weights, strict=False)  # `best` was written first
        save_model(run, unit, which, model, result.kept_tensors, files)
    return wanted
