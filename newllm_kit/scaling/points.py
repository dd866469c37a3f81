"""The points a scaling fit rests on: results.jsonl records, CSV tables and run directories read
into `Point`s (repeats counted once), the latest usable run, and the check that sources measured
the same data before their points are fitted together.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import compress, islice, repeat
from operator import itemgetter, not_
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError, UserError
from ..result_records import unit_records
from ..strict_json import json_text
from ..user_files import read_bounded

MAX_SOURCE_BYTES = 1 << 29  # 512 MiB: about 28M rows of a CSV table; a bound that /dev/zero cannot pass
CSV_BLOCK = 1 << 16  # lines of a table split into cells at once
ODD_LINE_BREAKS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines breaks lines there too


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
    data = read_bounded(path, MAX_SOURCE_BYTES, "results file", DataError)
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
        if record["val_ppl"] is None:
            continue  # a unit that evaluated nothing (null: no number) is no point of a fit
        prints = record.get("fingerprints")
        seed = record.get("seed")
        points.append(Point(series(record), positive_number(record["train_tokens"], "train_tokens", where),
                            positive_number(record["val_ppl"], "val_ppl", where),
                            None if prints is None else json.dumps(prints, sort_keys=True), str(path),
                            seed if isinstance(seed, int) else None))
    return points


def _load_csv(path: Path, text: str) -> list[Point]:
    """A table with model, tokens (or a run's `results.csv` name, train_tokens) and val_ppl columns."""
    reader = csv.DictReader(text.splitlines(), strict=True)  # strict: an unclosed quote is an error, not
    try:                                                       # one cell swallowing the rest of the table
        return _csv_columns(path, text) or _csv_points(path, reader)
    except csv.Error as error:  # a field over the csv module's limit, a NUL byte, broken quoting
        raise DataError(f"{path}: line {reader.line_num + 1}: not a CSV table ({error}); give a table with "
                        f"model, tokens and val_ppl columns") from None


def _csv_columns(path: Path, text: str) -> list[Point] | None:
    """The points of a plain table (no quoting, no blank or ragged lines), read column by column a
    block of lines at a time: passes in C over each column instead of a dict, two checks and a tuple
    per row in Python, so millions of rows read in seconds and only one block's cells are held.
    None when any row needs the row-by-row reading, which names it in its error (or skips it)."""
    if '"' in text or any(separator in text for separator in ODD_LINE_BREAKS):
        return None
    lines = io.StringIO(text, newline=None)  # \n, \r\n and \r end a line, as for str.splitlines
    names = [name.strip() for name in lines.readline().split(",")]
    if len(set(names)) != len(names) or "model" not in names or "val_ppl" not in names:
        return None
    points: list[Point] = []
    while block := list(islice(lines, CSV_BLOCK)):
        read = _csv_block(path, names, block)
        if read is None:
            return None
        points += read
    return points or None


def _csv_block(path: Path, names: list[str], block: list[str]) -> list[Point] | None:
    """The points of some lines of a plain table (each ends in a line break but perhaps the last)."""
    if set(map(str.count, block, repeat(","))) != {len(names) - 1}:
        return None  # a blank or ragged line
    cells = ",".join(block).split(",")
    column = {name: cells[i::len(names)] for i, name in enumerate(names)}
    del cells
    tokens = "tokens" if "tokens" in names else "train_tokens"
    try:  # float() ignores the blanks and line breaks around a number; the text columns are stripped
        counts, ppls = list(map(float, column[tokens])), list(map(float, column["val_ppl"]))
    except (KeyError, ValueError):
        return None
    models = list(map(str.strip, column["model"]))
    values = np.array([counts, ppls])
    if not all(models) or not (np.isfinite(values).all() and (values > 0).all()):
        return None
    if "variant" in column:
        models = [f"{m}@{v}" if v else m for m, v in zip(models, map(str.strip, column["variant"]), strict=True)]
    prints = [f or None for f in map(str.strip, column["fingerprint"])] if "fingerprint" in column else repeat(None)
    seeds = ([int(s) if s.isdigit() else None for s in map(str.strip, column["seed"])] if "seed" in column
             else repeat(None))
    # tuple.__new__ builds each Point in C; Point(...) would run its Python __new__ per row
    return list(map(tuple.__new__, repeat(Point), zip(map(sys.intern, models), counts, ppls, prints,
                                                      repeat(str(path)), seeds)))


def _csv_points(path: Path, reader: csv.DictReader[str]) -> list[Point]:
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
        if not row["val_ppl"]:
            continue  # an empty cell: that unit has no PPL (it evaluated nothing)
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
    return (path.is_file() and path.stat().st_size > 0) or bool(unit_records(run))


def run_results_text(run: Path) -> str:
    """A run directory's finished records as results.jsonl text: from the unit record files where the
    run has them (up to date while units still run elsewhere), else its results.jsonl."""
    records = unit_records(run)
    if records:
        return "".join(json_text(record) + "\n" for record in records)
    return _read(run / "results.jsonl")


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
    with _no_cycle_collection():
        for source in sources:
            _load_source(source, points, warnings, done)
        return _drop_repeats(points, warnings), warnings


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector: a large table is millions of tuples, none in a cycle, and
    the collector would walk all of them again and again as they are made (4× the reading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load_source(source: Path, points: list[Point], warnings: list[str], done: set[Path]) -> None:
    """Append the points of one run directory, results.jsonl or CSV table (once, however often given)."""
    path = source / "results.jsonl" if source.is_dir() else source
    if source.is_dir() and not _has_results(source):
        raise DataError(f"{source}: {_why_empty(source)}")
    if source.is_dir() and _status(source) == "failed":
        warnings.append(f"{source}: this run failed (see meta.json); fitting the units it finished")
    if path.resolve() in done:
        warnings.append(f"{path} was given twice; read once")
        return
    done.add(path.resolve())
    text = run_results_text(source) if source.is_dir() else _read(path)
    is_jsonl = path.suffix in (".jsonl", ".json") or (path.suffix != ".csv" and text.lstrip()[:1] == "{")
    loaded = _load_jsonl(path, text) if is_jsonl else _load_csv(path, text)
    if not loaded:
        raise DataError(f"{path}: empty (no data rows)")
    points.extend(loaded)


def _drop_repeats(points: list[Point], warnings: list[str]) -> list[Point]:
    """Keep one copy of each result: the same model, tokens and PPL from the same data (equal or
    missing fingerprints) is one measurement, and counting it twice would narrow every interval."""
    # Only points whose (model, tokens, PPL) hash is shared can be repeats: find them in C, then look
    # at those few one by one.
    hashes = np.fromiter(map(hash, map(itemgetter(0, 1, 2), points)), np.int64, len(points))
    ordered = np.sort(hashes)
    shared = ordered[1:][ordered[1:] == ordered[:-1]]
    if not shared.size:
        return points
    maybe = np.isin(hashes, shared).tolist()
    kept = list(compress(points, map(not_, maybe)))
    first: dict[tuple[str, float, float], Point] = {}  # (model, tokens, PPL) -> its first copy
    copies: dict[tuple[str, float, float], dict[str | None, Point]] = {}  # by fingerprint, where several are kept
    repeats: dict[tuple[str, str], list[Point]] = {}  # (source, source of the kept copy) -> repeats
    for p in compress(points, maybe):
        key = (p.model, p.tokens, p.ppl)
        earlier = first.setdefault(key, p)
        if earlier is p:
            kept.append(p)
            continue
        same = copies.setdefault(key, {earlier.fingerprint: earlier})
        twin = earlier if p.fingerprint is None else same.get(p.fingerprint) or same.get(None)
        if twin is None:
            same[p.fingerprint] = p
            kept.append(p)
        else:
            repeats.setdefault((p.source, twin.source), []).append(p)
    for (source, original), extra in repeats.items():
        names = ", ".join(f"{p.model} at {p.tokens:,.0f} tokens" for p in extra[:3])
        names += f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        where = "more than once" if source == original else f"from {original} again"
        warnings.append(f"{source} lists {len(extra)} point(s) {where} ({names}); each is counted once")
    return kept


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
    """Refuse to mix results whose data fingerprints (corpus, tokenizer, split, embedding table) differ,
    within one source (a run directory, a CSV or JSONL file) as much as between sources.

    Returns the warnings it adds; they are also appended to `warnings` when given.
    """
    by_source: dict[str, dict[str, Point]] = {}  # source -> fingerprint -> its first point there
    for p in points:
        if p.fingerprint is not None:
            by_source.setdefault(p.source, {}).setdefault(p.fingerprint, p)
    added = []
    unchecked = sorted({p.source for p in points if p.fingerprint is None})
    if unchecked and len({p.source for p in points}) > 1:
        added.append(f"{', '.join(unchecked)}: no data fingerprints, so comparability is not checked")
    mixed = next((source for source in sorted(by_source) if len(by_source[source]) > 1), None)
    first: dict[str, str] = {}  # fingerprint -> first source (in sorted order) that has it
    for source in sorted(by_source):
        for fingerprint in by_source[source]:
            first.setdefault(fingerprint, source)
    message = None
    if mixed is not None:
        a, b = list(by_source[mixed].values())[:2]
        message = (f"{mixed} holds results with different data fingerprints ({a.model} at {a.tokens:,.0f} tokens, "
                   f"{b.model} at {b.tokens:,.0f} tokens), which are not comparable")
    elif len(first) > 1:
        sources = sorted(set(first.values()))
        message = f"{sources[0]} and {sources[1]} have different data fingerprints and are not comparable"
    if message is not None:
        if not allow_mixed:
            raise UserError(f"{message}; pass --allow-mixed to combine them anyway")
        added.append(f"{message}; combined anyway (--allow-mixed)")
    if warnings is not None:
        warnings.extend(added)
    return added
