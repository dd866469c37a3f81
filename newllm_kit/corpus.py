"""From a data source to token streams: text schemes, train/validation rows, cached tokenisation.

The reference runs differ in how a conversation becomes text (spec §1.2: first turn or all turns,
truncated or not), and the seed lost track of which one produced which number (spec §7.1). Here
the scheme is an explicit name, it is part of every cache key, and the corpus, tokenizer, scheme
and split fingerprints are returned so the run directory records exactly what was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from .errors import ConfigError, DataError, PluginError
from .protocols import DataSource, Tokenizer, TokenizerFactory, missing_members
from .rundir import atomic_write_bytes

CACHE_FORMAT = 1


@dataclass(frozen=True)
class TextScheme:
    """How one document (a list of turns) becomes one sample's text, and its token limit."""

    name: str
    joiner: str | None  # None: the first turn only
    max_tokens: int | None

    def text(self, turns: Sequence[str]) -> str:
        return turns[0] if self.joiner is None else self.joiner.join(turns)


SCHEMES: dict[str, TextScheme] = {
    s.name: s
    for s in (
        TextScheme("first_turn", None, None),  # T2
        TextScheme("first_turn_128", None, 128),  # T1
        TextScheme("all_turns", "\n", None),  # T3
        TextScheme("all_turns_space_512", " ", 512),  # T4
    )
}


def get_scheme(name: str) -> TextScheme:
    if name not in SCHEMES:
        raise ConfigError(f"data.text: unknown text scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def read_text(path: Path, source: str) -> str:
    """A corpus file as text, or a one-line DataError naming the file and why it is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"data source {source!r}: cannot read {path} ({error.strerror or error})") from None
    if b"\0" in data:
        raise DataError(f"data source {source!r}: {path} is binary (it holds NUL bytes), not text; remove it "
                        f"or point the source at text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"data source {source!r}: {path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                        f"convert the file to UTF-8, e.g. with iconv") from None


def jsonl_rows(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON Lines file; anything that is not UTF-8
    JSON is a one-line DataError naming the file and the line."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError(f"data source {source!r}: cannot read {path} ({error.strerror or error})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):  # lines end at b"\n" only, as JSON Lines says
            where = f"data source {source!r}: {path}:{number}"
            if b"\0" in raw:
                raise DataError(f"{where}: holds NUL bytes, so the file is binary, not JSON Lines text")
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                value = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text; convert the file to UTF-8, e.g. with iconv") from None
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON at column {error.colno} ({error.msg.removesuffix(' at')}); "
                                f"fix or remove that line") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply; fix or remove that line") from None
            yield number, value


def scheme_texts(documents: Sequence[Sequence[str]], scheme: TextScheme, rows: Sequence[int]) -> list[str]:
    """One text per document; `rows` only labels errors. Every text must be encodable as UTF-8, so a
    data source's mistake surfaces here, named by row, and not inside a tokenizer."""
    if len(documents) != len(rows):
        raise DataError(f"data: the data source returned {len(documents)} documents for {len(rows)} rows; "
                        f"the data-source plugin is inconsistent")
    texts = []
    for row, turns in zip(rows, documents, strict=True):
        if not turns:
            raise DataError(f"data: row {row} has no turns; every document needs at least one")
        bad = next((t for t in turns if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"data: row {row}: a turn is {type(bad).__name__}, not text; the data-source "
                            f"plugin is inconsistent")
        text = scheme.text(turns)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(f"data: row {row}: character {error.start} is {text[error.start]!r}, a lone "
                            f"surrogate that is not text; fix that row of the corpus") from None
        texts.append(text)
    return texts


@dataclass
class Stream:
    """Samples tokenised one by one and concatenated, nothing in between (spec §1.3).

    `boundaries[i]` is the `(start, end)` slice of sample i in `ids`; an empty sample has start == end.
    """

    ids: torch.Tensor
    boundaries: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.ids.numel())


def build_stream(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int | None) -> Stream:
    """Tokenise each text on its own (cut to its first `max_tokens` ids) and concatenate."""
    if not texts:
        raise DataError("data: no documents to tokenise; select at least one row")
    ids: list[int] = []
    boundaries: list[tuple[int, int]] = []
    for text in texts:
        sample = tokenizer.encode(text)
        if max_tokens is not None:
            sample = sample[:max_tokens]
        boundaries.append((len(ids), len(ids) + len(sample)))
        ids.extend(sample)
    if not ids:
        raise DataError(f"data: the {len(texts)} selected document(s) tokenise to 0 tokens; "
                        f"select other rows")
    tensor = torch.tensor(ids, dtype=torch.long)
    if int(tensor.min()) < 0 or int(tensor.max()) >= tokenizer.vocab_size:
        raise DataError(f"tokenizer produced id {int(tensor.max())} outside its vocab_size "
                        f"{tokenizer.vocab_size}; the tokenizer plugin is inconsistent")
    return Stream(tensor, boundaries)


def _show(rows: range) -> str:
    return f"{rows.start}…{rows.stop - 1}"


@dataclass(frozen=True)
class Split:
    """Training rows and validation rows of one corpus: explicit, contiguous and disjoint (spec §7.2)."""

    train: range
    val: range

    @classmethod
    def of(cls, train_start: int, train_count: int, val_start: int, val_count: int) -> Split:
        return cls(range(train_start, train_start + train_count), range(val_start, val_start + val_count))

    def check(self, corpus_rows: int | None) -> None:
        for what, rows in (("training", self.train), ("validation", self.val)):
            if len(rows) == 0 or rows.step != 1 or rows.start < 0:
                raise DataError(f"data: {what} rows {rows} must be a non-empty run of rows from ≥ 0")
        if self.train.start < self.val.stop and self.val.start < self.train.stop:
            raise DataError(f"data: training rows {_show(self.train)} overlap validation rows "
                            f"{_show(self.val)}; move data.val.start past {self.train.stop - 1} "
                            f"or train on fewer samples")
        needed = max(self.train.stop, self.val.stop)
        if corpus_rows is not None and needed > corpus_rows:
            raise DataError(f"data: rows up to {needed - 1} requested (training {_show(self.train)}, "
                            f"validation {_show(self.val)}) but the corpus has {corpus_rows} rows; "
                            f"lower experiment.samples or data.val.start/count")

    def fingerprint(self, scheme: str, corpus: str) -> str:
        """Independent of the training size: every size trains on a prefix from `train.start`."""
        payload = {"train_start": self.train.start, "val": [self.val.start, self.val.stop],
                   "scheme": scheme, "corpus": corpus}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stream_cache_path(cache_dir: Path, corpus: str, scheme: str, tokenizer: str, rows: range) -> Path:
    payload = {"format": CACHE_FORMAT, "corpus": corpus, "scheme": scheme, "tokenizer": tokenizer,
               "rows": [rows.start, rows.stop]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"stream-{key[:32]}.safetensors"


def _read_cached(path: Path) -> Stream | None:
    """A cached stream, or None when absent or unreadable (it is then rebuilt and overwritten)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        ids, bounds = tensors["ids"], tensors["boundaries"]
    except (SafetensorError, KeyError, OSError):
        return None
    if ids.dim() != 1 or bounds.dim() != 2 or bounds.shape[1] != 2:
        return None
    return Stream(ids.long(), [(int(a), int(b)) for a, b in bounds.tolist()])


def cached_stream(texts: Sequence[str], tokenizer: Tokenizer, scheme: TextScheme, path: Path) -> Stream:
    """`build_stream`, reusing the file at `path` when one was written for the same key."""
    stream = _read_cached(path)
    if stream is not None and len(stream.boundaries) == len(texts):
        return stream
    stream = build_stream(texts, tokenizer, scheme.max_tokens)
    bounds = torch.tensor(stream.boundaries, dtype=torch.long).reshape(-1, 2)
    atomic_write_bytes(path, save_tensors({"ids": stream.ids.contiguous(), "boundaries": bounds}))
    return stream


def load_streams(
    source: DataSource,
    scheme: str,
    tokenizer_factory: TokenizerFactory,
    train_rows: range,
    val_rows: range,
    cache_dir: Path,
) -> tuple[Stream, Stream, Tokenizer, dict[str, str]]:
    """Read, tokenise and cache the training and validation streams of one experiment.

    The tokenizer is loaded (or trained) on the training texts only, so nothing about the
    validation rows leaks into it. Returns (train, val, tokenizer, fingerprints) where the
    fingerprints are `corpus`, `tokenizer`, `scheme` and `split`.
    """
    text_scheme = get_scheme(scheme)
    split = Split(train_rows, val_rows)
    split.check(source.size())
    corpus = source.fingerprint()
    train_texts = scheme_texts(source.documents(list(train_rows)), text_scheme, train_rows)
    val_texts = scheme_texts(source.documents(list(val_rows)), text_scheme, val_rows)
    tokenizer = tokenizer_factory.load(train_texts, Path(cache_dir))
    missing = missing_members(tokenizer, Tokenizer)
    if missing:
        raise PluginError(f"tokenizer: {type(tokenizer_factory).__name__}.load() returned "
                          f"{type(tokenizer).__name__}, which lacks {', '.join(map(repr, missing))} required by "
                          f"newllm_kit.protocols.Tokenizer; fix the tokenizer plugin")

    def path(rows: range) -> Path:
        return _stream_cache_path(Path(cache_dir), corpus, text_scheme.name, tokenizer.fingerprint, rows)

    train = cached_stream(train_texts, tokenizer, text_scheme, path(train_rows))
    val = cached_stream(val_texts, tokenizer, text_scheme, path(val_rows))
    fingerprints = {
        "corpus": corpus,
        "tokenizer": tokenizer.fingerprint,
        "scheme": text_scheme.name,
        "split": split.fingerprint(text_scheme.name, corpus),
    }
    return train, val, tokenizer, fingerprints
