"""The points a scaling fit rests on: results.jsonl records, CSV tables and run directories read
into `Point`s (repeats counted once), the latest usable run, and the check that sources measured
the same data before their points are fitted together.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DataError, UserError


class Point(NamedTuple):
    model: str  # the series a fit is drawn through: the model, or `model@variant` in a sweep
    tokens: float
    ppl: float
    fingerprint: str | None
    source: str
    seed: int | None = None  # replicates of one model and size differ in their seed


def series(record: dict[str, Any]) -> str:
    """What a fit or comparison groups a record under: `A`, or `A@lr-0.1` for a sweep variant's A."""
    variant = record.get("variant") or ""
    return f"{record['model']}@{variant}" if variant else str(record["model"])


def positive_number(raw: Any, what: str, where: str) -> float:
    """A finite, positive float, or a one-line DataError naming where it came from."""
    try:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(raw)
        value = float(raw)
    except OverflowError:  # an integer beyond float range, e.g. a JSON 1 followed by 400 zeros
        raise DataError(f"{where}: {what} must be finite and positive (got a {len(str(raw))}-digit number)") from None
    except ValueError:
        raise DataError(f"{where}: {what} is not a number ({raw!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{where}: {what} must be finite and positive (got {raw!r})")
    return value


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a spreadsheet's BOM must not rename "model"
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"cannot read {path}: line {line} is not UTF-8 text") from None


def _load_jsonl(path: Path, text: str) -> list[Point]:
    points = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: not a results record (nested too deeply)") from None
        if not isinstance(record, dict) or not {"model", "train_tokens", "val_ppl"} <= record.keys():
            raise DataError(f"{where}: expected a JSON object with model, train_tokens and val_ppl")
        prints = record.get("fingerprints")
        seed = record.get("seed")
        points.append(Point(series(record), positive_number(record["train_tokens"], "train_tokens", where),
                            positive_number(record["val_ppl"], "val_ppl", where),
                            None if prints is None else json.dumps(prints, sort_keys=True), str(path),
                            seed if isinstance(seed, int) else None))
    return points


def _load_csv(path: Path, text: str) -> list[Point]:
    """A table with model, tokens (or a run's `results.csv` name, train_tokens) and val_ppl columns."""
    reader = csv.DictReader(text.splitlines())
    names = [name.strip() for name in reader.fieldnames or []]
    tokens = "tokens" if "tokens" in names else "train_tokens"
    missing = [c for c in ("model", tokens, "val_ppl") if c not in names]
    if names and missing:
        missing = ["tokens (or train_tokens)" if c == tokens else c for c in missing]
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (need model, tokens, val_ppl)")
    points = []
    for raw in reader:
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
        where = f"{path}: row {reader.line_num}"
        if not row["model"]:
            raise DataError(f"{where}: empty model name")
        seed = row.get("seed") or ""
        points.append(Point(series(row), positive_number(row[tokens], tokens, where),
                            positive_number(row["val_ppl"], "val_ppl", where), row.get("fingerprint") or None,
                            str(path), int(seed) if seed.isdigit() else None))
    return points


def _status(run: Path) -> str | None:
    """A run directory's `status` from meta.json (None when there is no readable one)."""
    try:
        meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = meta.get("status") if isinstance(meta, dict) else None
    return status if isinstance(status, str) else None


def _has_results(run: Path) -> bool:
    path = run / "results.jsonl"  # written once the first unit finishes, never empty after that
    return path.is_file() and path.stat().st_size > 0


def _why_empty(run: Path) -> str:
    """What a run directory without finished units says about itself, from meta.json."""
    status = _status(run)
    if status == "failed":
        return "this run failed before any unit finished (see meta.json)"
    if status in ("running", "interrupted"):
        return f"no unit of this run has finished yet (status {status!r} in meta.json)"
    return "no results.jsonl in this directory"


def load_points(sources: list[Path]) -> tuple[list[Point], list[str]]:
    """Read run directories, results.jsonl files and CSV tables into one list (plus warnings)."""
    points: list[Point] = []
    warnings: list[str] = []
    done: set[Path] = set()
    for source in sources:
        path = source / "results.jsonl" if source.is_dir() else source
        if source.is_dir() and not _has_results(source):
            raise DataError(f"{source}: {_why_empty(source)}")
        if source.is_dir() and _status(source) == "failed":
            warnings.append(f"{source}: this run failed (see meta.json); fitting the units it finished")
        if path.resolve() in done:
            warnings.append(f"{path} was given twice; read once")
            continue
        done.add(path.resolve())
        text = _read(path)
        is_jsonl = path.suffix in (".jsonl", ".json") or (path.suffix != ".csv" and text.lstrip()[:1] == "{")
        loaded = _load_jsonl(path, text) if is_jsonl else _load_csv(path, text)
        if not loaded:
            raise DataError(f"{path}: empty (no data rows)")
        points.extend(loaded)
    return _drop_repeats(points, warnings), warnings


def _drop_repeats(points: list[Point], warnings: list[str]) -> list[Point]:
    """Keep one copy of each result: the same model, tokens and PPL from the same data (equal or
    missing fingerprints) is one measurement, and counting it twice would narrow every interval."""
    kept: dict[tuple[str, float, float], list[Point]] = {}
    repeats: dict[tuple[str, str], list[Point]] = {}  # (source, source of the kept copy) -> repeats
    for p in points:
        same = kept.setdefault((p.model, p.tokens, p.ppl), [])
        twin = next((q for q in same if None in (p.fingerprint, q.fingerprint) or p.fingerprint == q.fingerprint),
                    None)
        if twin is None:
            same.append(p)
        else:
            repeats.setdefault((p.source, twin.source), []).append(p)
    for (source, original), extra in repeats.items():
        names = ", ".join(f"{p.model} at {p.tokens:,.0f} tokens" for p in extra[:3])
        names += f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        where = "more than once" if source == original else f"from {original} again"
        warnings.append(f"{source} lists {len(extra)} point(s) {where} ({names}); each is counted once")
    return [p for same in kept.values() for p in same]


def latest_run_dir(root: Path = Path("runs")) -> tuple[Path, list[str]]:
    """The most recently modified `runs/<experiment>/<run>/` with finished units that did not fail,
    and a note for each newer run passed over (a user who just saw a run fail must not be shown
    an older run's fit without being told)."""
    runs = [p for p in root.glob("*/*") if (p / "config.resolved.toml").is_file() or (p / "results.jsonl").is_file()]
    notes = []
    for run in sorted(runs, key=lambda p: (p.stat().st_mtime, str(p)), reverse=True):
        if not _has_results(run):
            notes.append(f"skipped {run}: {_why_empty(run)}")
        elif _status(run) == "failed":
            notes.append(f"skipped {run}: this run failed (see meta.json); pass it as a SOURCE to fit the units "
                         f"it finished")
        else:
            return run, notes
    latest = f" (the latest, {notes[0].removeprefix('skipped ')})" if notes else ""
    raise DataError(f"no run with finished units under {root}/*/*/{latest}; pass a SOURCE or run "
                    f"`newllm-kit run` first")


def check_comparable(points: list[Point], allow_mixed: bool, warnings: list[str] | None = None) -> list[str]:
    """Refuse to mix sources whose data fingerprints (corpus, tokenizer, split, embedding table) differ.

    Returns the warnings it adds; they are also appended to `warnings` when given.
    """
    first: dict[str, str] = {}  # fingerprint -> first source (in sorted order) that has it
    for p in sorted(points, key=lambda p: (p.source, p.fingerprint or "")):
        if p.fingerprint is not None:
            first.setdefault(p.fingerprint, p.source)
    sources, added = sorted(set(first.values())), []
    unchecked = sorted({p.source for p in points if p.fingerprint is None})
    if unchecked and len({p.source for p in points}) > 1:
        added.append(f"{', '.join(unchecked)}: no data fingerprints, so comparability is not checked")
    if len(first) > 1 and len(sources) > 1:
        message = f"{sources[0]} and {sources[1]} have different data fingerprints and are not comparable"
        if not allow_mixed:
            raise UserError(f"{message}; pass --allow-mixed to combine them anyway")
        added.append(f"{message}; combined anyway (--allow-mixed)")
    if warnings is not None:
        warnings.extend(added)
    return added
