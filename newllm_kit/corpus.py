"""From a data source to token streams: text schemes, train/validation rows, cached tokenisation.

The reference runs differ in how a conversation becomes text (spec §1.2: first turn or all turns,
truncated or not), and the seed lost track of which one produced which number (spec §7.1). Here
the scheme is an explicit name, it is part of every cache key, and the corpus, tokenizer, scheme
and split fingerprints are returned so the run directory records exactly what was trained on.
A stream is cached as raw int32 ids, written a batch of documents at a time and memory-mapped when
used, so tokenising and holding 10M tokens takes 40 MB, not the 0.4 GB of a list of Python ints.
The sha256 of the ids and of the boundaries is taken while they are written and kept beside them
(`sha256sum -c` reads it); a cache whose content no longer matches is rebuilt with a warning, so an
edited or swapped file cannot change a result while every size and bound still fits.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError, DataError, PluginError
from .protocols import DataSource, Tokenizer, TokenizerFactory, missing_members
from .rundir import atomic_write_bytes, atomic_writer
from .user_files import check_regular

if TYPE_CHECKING:
    from .config import Choice

CACHE_FORMAT = 2  # 2: raw int32 ids + .npy boundaries, memory-mapped; format 1 files are never read
ENCODE_BATCH = 1024  # documents tokenised per write: bounds the ids held as Python objects
DOCUMENT_BATCH = 4096  # rows asked of the data source at once: bounds the turns held before the scheme picks
INT32_LIMIT = 2**31
HASH_CHUNK = 1 << 20  # bytes hashed at a time when a cache is verified: memory stays flat whatever its size


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
    check_regular(path, f"data source {source!r} file", DataError)  # /dev/zero never ends, a FIFO waits
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
    check_regular(path, f"data source {source!r} file", DataError)
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

    `ids` is int32 (what nn.Embedding and index tensors accept) over a memory map of the cache file,
    so a stream costs 4 B per token and only its pages in use. `boundaries[i]` is the `(start, end)`
    slice of sample i in `ids` (an int64 [samples, 2] array); an empty sample has start == end.
    """

    ids: torch.Tensor
    boundaries: np.ndarray
    sha256: str = ""  # of the ids as written: what meta.json records and a resume compares

    def __len__(self) -> int:
        return int(self.ids.numel())


def _bounds_path(ids_path: Path) -> Path:
    return ids_path.with_name(ids_path.name.removesuffix(".ids") + ".bounds.npy")


def _hash_path(ids_path: Path) -> Path:
    return ids_path.with_name(ids_path.name.removesuffix(".ids") + ".sha256")


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _write_hashes(ids_path: Path, ids_sha256: str, bounds_sha256: str) -> None:
    """`<hash>  <file>` lines, the format `sha256sum -c` checks, written after the files they name."""
    lines = f"{ids_sha256}  {ids_path.name}\n{bounds_sha256}  {_bounds_path(ids_path).name}\n"
    atomic_write_bytes(_hash_path(ids_path), lines.encode("ascii"))


def _read_hashes(ids_path: Path) -> dict[str, str] | None:
    """File name -> recorded sha256, or None when the record is absent or not in that format."""
    try:
        text = _hash_path(ids_path).read_text(encoding="ascii")
    except (OSError, ValueError):
        return None
    recorded = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            return None
        recorded[name] = digest
    return recorded


def texts_sha256(texts: Sequence[str]) -> str:
    """Order-sensitive sha256 of a list of texts, each length-prefixed so boundaries count: what data
    sources and trained tokenizers fingerprint their texts with."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file read `HASH_CHUNK` bytes at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _encoded(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int | None) -> tuple[np.ndarray, list[int]]:
    """The ids of `texts` concatenated, each cut to its first `max_tokens`, as int32, and each one's length."""
    samples = [tokenizer.encode(text)[:max_tokens] for text in texts]
    lengths = [len(sample) for sample in samples]
    ids = np.fromiter(chain.from_iterable(samples), dtype=np.int64, count=sum(lengths))
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if low < 0 or high >= tokenizer.vocab_size:
        raise DataError(f"tokenizer produced id {low if low < 0 else high} outside its vocab_size "
                        f"{tokenizer.vocab_size}; the tokenizer plugin is inconsistent")
    return ids.astype("<i4"), lengths


def build_stream(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int | None, path: Path) -> Stream:
    """Tokenise each text on its own (cut to its first `max_tokens` ids), concatenate, and write the
    ids to `path` as raw little-endian int32 with the boundaries beside it. Ids reach the file
    `ENCODE_BATCH` documents at a time: memory grows by one length per document, not per token."""
    if not texts:
        raise DataError("data: no documents to tokenise; select at least one row")
    if tokenizer.vocab_size > INT32_LIMIT:
        raise DataError(f"tokenizer: vocab_size {tokenizer.vocab_size} does not fit int32 ids; "
                        f"the tokenizer plugin is inconsistent")
    lengths: list[int] = []
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    _hash_path(path).unlink(missing_ok=True)  # until the new files are complete, nothing vouches for them
    with atomic_writer(path) as handle:
        for start in range(0, len(texts), ENCODE_BATCH):
            ids, batch = _encoded(texts[start:start + ENCODE_BATCH], tokenizer, max_tokens)
            raw = ids.tobytes()
            handle.write(raw)
            digest.update(raw)
            lengths += batch
        if not any(lengths):
            raise DataError(f"data: the {len(texts)} selected document(s) tokenise to 0 tokens; "
                            f"select other rows")
    ends = np.cumsum(lengths, dtype=np.int64)
    boundaries = np.stack([ends - lengths, ends], axis=1)
    buffer = io.BytesIO()
    np.save(buffer, boundaries, allow_pickle=False)
    atomic_write_bytes(_bounds_path(path), buffer.getvalue())
    _write_hashes(path, digest.hexdigest(), hashlib.sha256(buffer.getvalue()).hexdigest())
    return Stream(torch.from_numpy(np.memmap(path, dtype="<i4", mode="c")), boundaries, digest.hexdigest())


def _show(rows: range) -> str:
    return f"{rows.start}…{rows.stop - 1}"


@dataclass(frozen=True)
class Split:
    """Training rows and validation rows of one corpus: explicit, contiguous and disjoint (spec §7.2)."""

    train: range
    val: range
    dev: range | None = None  # the development rows early stopping reads instead of validation

    @classmethod
    def of(cls, train_start: int, train_count: int, val_start: int, val_count: int,
           dev: tuple[int, int] | None = None) -> Split:
        """Rows from (start, count) pairs; `dev` is the development split's, where there is one."""
        return cls(range(train_start, train_start + train_count), range(val_start, val_start + val_count),
                   None if dev is None else range(dev[0], dev[0] + dev[1]))

    def check(self, corpus_rows: int | None) -> None:
        named = [("training", "experiment.samples", self.train), ("validation", "data.val", self.val)]
        named += [("development", "data.dev", self.dev)] if self.dev is not None else []
        for what, _, rows in named:
            if len(rows) == 0 or rows.step != 1 or rows.start < 0:
                raise DataError(f"data: {what} rows {rows} must be a non-empty run of rows from ≥ 0")
        if self.train.start < self.val.stop and self.val.start < self.train.stop:
            raise DataError(f"data: training rows {_show(self.train)} overlap validation rows "
                            f"{_show(self.val)}; move data.val.start past {self.train.stop - 1} "
                            f"or train on fewer samples")
        if self.dev is not None:
            for what, key, rows in named[:2]:
                if self.dev.start < rows.stop and rows.start < self.dev.stop:
                    raise DataError(f"data: development rows {_show(self.dev)} overlap {what} rows {_show(rows)} "
                                    f"({key}); move data.dev.start so the three splits are disjoint")
        needed = max(rows.stop for _, _, rows in named)
        if corpus_rows is not None and needed > corpus_rows:
            raise DataError(f"data: rows up to {needed - 1} requested ("
                            + ", ".join(f"{what} {_show(rows)}" for what, _, rows in named)
                            + f") but the corpus has {corpus_rows} rows; lower experiment.samples or "
                            f"data.val{'/data.dev' if self.dev is not None else ''} start/count")

    def fingerprint(self, scheme: str, corpus: str, tokenizer_rows: range | None = None) -> str:
        """Independent of the training size: every size trains on a prefix from `train.start`, and a
        tokenizer trained on its own rows (`tokenizer_rows`) on the same rows whatever the sizes. The
        development rows count where there are some (a split without them keeps its old fingerprint)."""
        payload: dict[str, Any] = {"train_start": self.train.start, "val": [self.val.start, self.val.stop],
                                   "scheme": scheme, "corpus": corpus}
        if tokenizer_rows is not None:
            payload["tokenizer_rows"] = [tokenizer_rows.start, tokenizer_rows.stop]
        if self.dev is not None:
            payload["dev"] = [self.dev.start, self.dev.stop]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stream_cache_path(cache_dir: Path, corpus: str, scheme: str, tokenizer: str, rows: range) -> Path:
    payload = {"format": CACHE_FORMAT, "corpus": corpus, "scheme": scheme, "tokenizer": tokenizer,
               "rows": [rows.start, rows.stop]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"stream-{key[:32]}.ids"


def read_stream(path: Path, samples: int, vocab_size: int, warn: Callable[[str], None] = _warn) -> Stream | None:
    """The stream cached at `path`, or None when it is absent, its content differs from the sha256
    recorded beside it, or it does not hold `samples` consistent boundaries and in-vocabulary ids (it
    is then rebuilt and overwritten; `warn` names a cache that was there but is not trusted). Never
    unpickles."""
    if not path.exists() and not _bounds_path(path).exists():
        return None
    recorded = _read_hashes(path)
    if recorded is None:
        warn(f"token cache {path} has no readable content hash ({_hash_path(path).name}); rebuilding it")
        return None
    try:
        actual = {p.name: file_sha256(p) for p in (path, _bounds_path(path))}
        boundaries = np.load(_bounds_path(path), allow_pickle=False)
        size = path.stat().st_size
    except (OSError, ValueError, EOFError):
        warn(f"token cache {path} cannot be read; rebuilding it")
        return None
    changed = [name for name, digest in actual.items() if recorded.get(name) != digest]
    if changed:
        warn(f"token cache {path.parent / changed[0]} does not match the sha256 recorded when it was written; "
             f"rebuilding it")
        return None
    if boundaries.dtype != np.int64 or boundaries.shape != (samples, 2) or samples == 0:
        return None
    starts, ends = boundaries[:, 0], boundaries[:, 1]
    if (starts[0] != 0 or (starts[1:] != ends[:-1]).any() or (ends < starts).any()
            or ends[-1] == 0 or size != 4 * int(ends[-1])):
        return None
    ids = np.memmap(path, dtype="<i4", mode="c")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        return None
    return Stream(torch.from_numpy(ids), boundaries, actual[path.name])


def cached_stream(texts: Sequence[str], tokenizer: Tokenizer, scheme: TextScheme, path: Path,
                  warn: Callable[[str], None] = _warn) -> Stream:
    """`build_stream`, reusing the files at `path` when they were written for the same key and still
    hold what was written."""
    stream = read_stream(path, len(texts), tokenizer.vocab_size, warn)
    return stream if stream is not None else build_stream(texts, tokenizer, scheme.max_tokens, path)


def _texts(source: DataSource, scheme: TextScheme, rows: range) -> list[str]:
    """Each row's text, read `DOCUMENT_BATCH` rows at a time: a document's other turns (most of an
    UltraChat row under the first-turn schemes) are dropped before the next batch is read."""
    texts: list[str] = []
    for start in range(rows.start, rows.stop, DOCUMENT_BATCH):
        batch = range(start, min(start + DOCUMENT_BATCH, rows.stop))
        texts += scheme_texts(source.documents(list(batch)), scheme, batch)
    return texts


def load_streams(
    source: DataSource,
    scheme: str,
    tokenizer_factory: TokenizerFactory,
    train_rows: range,
    val_rows: range,
    cache_dir: Path,
    dev_rows: range | None = None,
) -> tuple[Stream, Stream, Tokenizer, dict[str, str]]:
    """Read, tokenise and cache the training and validation streams of one experiment.

    The tokenizer is loaded (or trained) on training texts only, so nothing about the validation
    rows leaks into it: a factory with a `train_rows` range (the `bpe` tokenizer's fixed rows) gets
    the texts of those rows, checked to be disjoint from validation; any other gets the training
    texts. Returns (train, val, tokenizer, fingerprints) where the fingerprints are `corpus`,
    `tokenizer`, `scheme` and `split` (which then includes the tokenizer's rows).
    """
    text_scheme = get_scheme(scheme)
    split = Split(train_rows, val_rows, dev_rows)
    size = source.size()
    split.check(size)
    corpus = source.fingerprint()
    train_texts, val_texts = _texts(source, text_scheme, train_rows), _texts(source, text_scheme, val_rows)
    tokenizer_rows: range | None = getattr(tokenizer_factory, "train_rows", None)
    if tokenizer_rows is not None:
        check_tokenizer_rows(tokenizer_rows, val_rows, size)
        if dev_rows is not None:
            check_tokenizer_rows(tokenizer_rows, dev_rows, size, "development")
    tokenizer_texts = train_texts if tokenizer_rows is None else _texts(source, text_scheme, tokenizer_rows)
    tokenizer = tokenizer_factory.load(tokenizer_texts, Path(cache_dir))
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
        "split": split.fingerprint(text_scheme.name, corpus, tokenizer_rows),
    }
    return train, val, tokenizer, fingerprints


def rows_stream(source: DataSource, scheme: str, tokenizer: Tokenizer, rows: range, cache_dir: Path,
                key: str = "data.val") -> Stream:
    """The stream of `rows` (the rows of `key`) tokenised by an existing tokenizer, cached as a run's
    streams are: a run's development stream, and what `newllm-kit evaluate` scores."""
    size = source.size()
    if len(rows) == 0 or rows.start < 0 or rows.stop > size:
        raise DataError(f"{key}: rows {_show(rows)} are not inside the corpus's {size} rows; set {key}.start "
                        f"and {key}.count within them")
    text_scheme = get_scheme(scheme)
    path = _stream_cache_path(Path(cache_dir), source.fingerprint(), text_scheme.name, tokenizer.fingerprint, rows)
    return cached_stream(_texts(source, text_scheme, rows), tokenizer, text_scheme, path)


def check_tokenizer_rows(rows: range, val_rows: range, corpus_rows: int | None, what: str = "validation") -> None:
    """The tokenizer's own training rows: inside the corpus and disjoint from validation (and development)."""
    if rows.start < val_rows.stop and val_rows.start < rows.stop:
        raise DataError(f"tokenizer.train_rows {_show(rows)} overlap {what} rows {_show(val_rows)}; set "
                        f"tokenizer.train_rows = {{ start = ..., count = ... }} outside them")
    if corpus_rows is not None and rows.stop > corpus_rows:
        raise DataError(f"tokenizer.train_rows {_show(rows)} reach past the corpus's {corpus_rows} rows; lower "
                        f"tokenizer.train_rows.count or start")


def embedding_provenance(choice: Choice) -> dict[str, Any]:
    """Where the embedding table comes from and what it is: the source, its settings (a hub id and
    `revision`, or a distribution; not the download cache) and `sha256`, the source's fingerprint:
    for `gpt2` the sha256 of the wte table itself, for `random` of its distribution (the table then
    follows from the experiment seed). Two runs with different values read different tables."""
    settings = {} if choice.settings is None else choice.settings.model_dump(mode="json", exclude={"cache_dir"})
    return {"source": choice.component.name, **settings, "sha256": choice.build().fingerprint()}
