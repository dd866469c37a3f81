"""Tokenizers that need no download: raw UTF-8 `bytes`, and a byte-level `bpe` trained per experiment.

`bpe` learns its merges from the texts of `tokenizer.train_rows` (a fixed set of rows, never
validation rows, the same whatever `experiment.samples` holds) and caches the result under a
name derived from those texts and its settings, so a rerun or a resumed run reloads the
identical tokenizer instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.corpus import texts_sha256
from newllm_kit.errors import DataError
from newllm_kit.rundir import atomic_write_text


class BytesTokenizer:
    """Each UTF-8 byte is a token: vocabulary 256, no training, no unknown tokens."""

    vocab_size = 256
    fingerprint = hashlib.sha256(b"newllm-kit bytes tokenizer: utf-8, 256 ids").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # a sample truncated to N tokens may end inside a multi-byte character
        return bytes(ids).decode("utf-8", errors="replace")


class BytesFactory:
    expected_vocab_size = BytesTokenizer.vocab_size

    def __init__(self, settings: None = None) -> None:
        pass

    def load(self, train_texts: Sequence[str], cache_dir: Path) -> BytesTokenizer:
        return BytesTokenizer()


class TrainRows(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int = Field(default=0, ge=0, le=10**9, description="First corpus row the tokenizer learns from.")
    count: int = Field(default=1000, ge=1, le=10**9, description="Number of rows it learns from.")


class BPESettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_rows: TrainRows = Field(
        default_factory=TrainRows,
        description="Rows the merges are learnt from: fixed, so adding a training size changes no other unit's "
                    "tokens (default 0…999, the seed's largest training set; must not overlap validation).")
    vocab_size: int = Field(
        default=2048, ge=256, le=1 << 24, description="Largest vocabulary: 256 byte tokens + learned merges.")
    min_frequency: int = Field(
        default=2, ge=1, le=2**32 - 1, description="A pair must occur this often in training text to merge.")


class BPETokenizer:
    """A `tokenizers` byte-level BPE; `fingerprint` hashes its JSON serialisation."""

    def __init__(self, serialised: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(serialised)
        self._serialised = serialised
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.fingerprint = hashlib.sha256(serialised.encode("utf-8")).hexdigest()

    def serialise(self) -> str:
        """The `tokenizers` JSON a kept model carries (its sha256 is the fingerprint)."""
        return self._serialised

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids)))


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    """Train a byte-level BPE on `texts` and return its JSON serialisation (no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return str(tokenizer.to_str())


class BPEFactory:
    """`bpe`: trained on the texts of `train_rows`, cached in `cache_dir/bpe-<key>.json`."""

    def __init__(self, settings: BPESettings | None = None) -> None:
        self.settings = settings if settings is not None else BPESettings()

    @property
    def expected_vocab_size(self) -> int:
        """The configured size; training may learn fewer merges on a small corpus."""
        return self.settings.vocab_size

    @property
    def train_rows(self) -> range:
        """The corpus rows whose texts `load` gets (the core reads them; see `newllm_kit.corpus.load_streams`)."""
        rows = self.settings.train_rows
        return range(rows.start, rows.start + rows.count)

    def cache_path(self, train_texts: Sequence[str], cache_dir: Path) -> Path:
        import tokenizers

        key = {"texts": texts_sha256(train_texts), "vocab_size": self.settings.vocab_size,
               "min_frequency": self.settings.min_frequency, "tokenizers": tokenizers.__version__}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return Path(cache_dir) / f"bpe-{digest[:32]}.json"

    def load(self, train_texts: Sequence[str], cache_dir: Path) -> BPETokenizer:
        if not any(train_texts):
            raise DataError('tokenizer \'bpe\': no training text to learn merges from; select training rows '
                            'with text, or set tokenizer.name = "bytes"')
        path = self.cache_path(train_texts, cache_dir)
        record = path.with_suffix(".sha256")  # what was written, so an edited or swapped file is not trusted
        if path.is_file():
            try:
                cached = path.read_text(encoding="utf-8")
                if record.read_text(encoding="ascii").split()[0] == hashlib.sha256(cached.encode()).hexdigest():
                    return BPETokenizer(cached)
                print(f"warning: tokenizer cache {path} does not match the sha256 recorded when it was written; "
                      f"retraining it", file=sys.stderr)
            except Exception:  # an unreadable cache entry (or its record) is retrained and overwritten
                print(f"warning: tokenizer cache {path} or its {record.name} cannot be read; retraining it",
                      file=sys.stderr)
        serialised = train_bpe(train_texts, self.settings.vocab_size, self.settings.min_frequency)
        record.unlink(missing_ok=True)
        atomic_write_text(path, serialised)
        atomic_write_text(record, f"{hashlib.sha256(serialised.encode()).hexdigest()}  {path.name}\n")
        return BPETokenizer(serialised)


@hookimpl
def register_tokenizers(register: Any) -> None:
    register("bytes", BytesFactory, description="UTF-8 bytes, vocabulary 256")
    register("bpe", BPEFactory, settings=BPESettings,
             description="byte-level BPE trained on tokenizer.train_rows (default 0…999) with `tokenizers`, cached")
