"""What a resumed run must share with the run it continues: the configuration, the embedding table it
named, and the fingerprints of the data it trained and scored on (one run directory, one set of data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, read_toml
from .config.reading import dotted_keys
from .corpus import embedding_provenance
from .errors import UserError
from .rundir import RunDir

PINNED = ("fingerprints", "variant_fingerprints")  # meta.json keys a later start keeps as they are
FINGERPRINT_MEANING = {"corpus": "the data source read other documents", "tokenizer": "the tokenizer changed",
                       "scheme": "the text scheme changed", "split": "the training or validation rows moved",
                       "embedding": "the embedding table changed",
                       "train_ids": "the training tokens differ from those the run trained on",
                       "val_ids": "the validation tokens differ from those the run scored"}



def pin_fingerprints(run: RunDir, variant: str, now: dict[str, str]) -> dict[str, str]:
    """Record `now` in meta.json the first time (`variant_fingerprints[variant]` in a sweep), and refuse
    a later start whose set differs: one run directory holds results of one set of data."""
    recorded = run.read_json("meta.json")
    recorded = recorded if isinstance(recorded, dict) else {}
    sets = recorded.get("variant_fingerprints") if variant else None
    before = (sets if isinstance(sets, dict) else {}).get(variant) if variant else recorded.get("fingerprints")
    if isinstance(before, dict):
        for component in sorted(set(before) & set(now)):
            if before[component] != now[component]:
                where = f"{component} fingerprint{f' of sweep variant {variant!r}' if variant else ''}"
                raise UserError(f"cannot resume {run.path}: the {where} differs from the run's meta.json "
                                f"({str(before[component])[:12]}… then, {now[component][:12]}… now: "
                                f"{FINGERPRINT_MEANING.get(component, 'other data')}); start a new run instead")
        return now
    if variant:
        recorded["variant_fingerprints"] = {**(sets if isinstance(sets, dict) else {}), variant: now}
        recorded.setdefault("fingerprints", now)
    else:
        recorded["fingerprints"] = now
    run.write_json("meta.json", recorded)
    return now


def check_resume_compatible(saved_file: Path, config: ExperimentConfig) -> None:
    """Refuse to mix results of two different configurations in one run directory."""
    saved, now = (_shaping_results(dotted_keys(table)) for table in (read_toml(saved_file), config.resolved()))
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differing:
        shown = ", ".join(differing[:8]) + (" …" if len(differing) > 8 else "")
        raise UserError(f"cannot resume: the configuration differs from the run's config.resolved.toml in "
                        f"{shown}; start a new run instead")
    # The same settings can name another table (the hub's `main` moves): the run's meta.json says which it used.
    try:
        recorded = json.loads((saved_file.parent / "meta.json").read_text(encoding="utf-8")).get("embedding")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, dict):
        now_embedding = embedding_provenance(config.embedding)
        changed = sorted(k for k in set(recorded) | set(now_embedding) if recorded.get(k) != now_embedding.get(k))
        if changed:
            key = changed[0]
            raise UserError(f"cannot resume: embedding.{key} differs from the run's meta.json ({recorded.get(key)!r} "
                            f"then, {now_embedding.get(key)!r} now), so Phase 2 would read another table; pin "
                            f"embedding.revision to the run's, or start a new run")


FREE_BETWEEN_STARTS = ("launcher", "tracking", "experiment.keep_models")


def _shaping_results(flat: dict[str, Any]) -> dict[str, Any]:
    """Settings that shape results: where units run (`[launcher]`), who watches them (`[tracking]`) and
    which trained models are kept may change between starts."""
    return {k: v for k, v in flat.items()
            if not any(k == free or k.startswith(f"{free}.") for free in FREE_BETWEEN_STARTS)}
