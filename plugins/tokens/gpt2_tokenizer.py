"""The `gpt2` tokenizer: the reference's GPT-2 BPE (spec §1.1), from a hub name or a local directory."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from newllm_kit.errors import DataError
from newllm_kit.registry import one_line

from ..hub import hub_offline, hub_reachable, local_or_hub

GPT2_VOCAB = 50257


class GPT2TokenizerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        default="gpt2", validation_alias=AliasChoices("name_or_path", "path"),
        description="Hub repo id, or a local directory with tokenizer files (alias: path).")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of a hub repo id; unset: main.")
    cache_dir: str | None = Field(
        default=None, description="Hub download cache (default: huggingface_hub's).")
    expect_vocab: int | None = Field(
        default=GPT2_VOCAB, ge=1, le=1 << 24,
        description="Required vocabulary size (catches empty or wrong tokenizers); None: any.")


class HFTokenizer:
    """A transformers fast tokenizer seen through the `Tokenizer` protocol, never adding special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self._backend = tokenizer.backend_tokenizer
        self.vocab_size = len(tokenizer)
        self.fingerprint = hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def serialise(self) -> str:
        """The `tokenizers` JSON a kept model carries (its sha256 is the fingerprint)."""
        return str(self._backend.to_str())


class GPT2TokenizerFactory:
    """The `gpt2` tokenizer: nothing to train, `train_texts` are ignored."""

    def __init__(self, settings: GPT2TokenizerSettings | None = None) -> None:
        self.settings = settings if settings is not None else GPT2TokenizerSettings()

    @property
    def expected_vocab_size(self) -> int | None:
        return self.settings.expect_vocab

    def _offline_error(self) -> DataError:
        return DataError(f"tokenizer 'gpt2': cannot load {self.settings.name_or_path} (offline or not "
                         f"cached); set tokenizer.name_or_path to a local GPT-2 tokenizer directory, or "
                         f'tokenizer.name = "bpe"')

    def _directory(self) -> Path | None:
        """Where to load from: a local or hub-cache directory; None to ask the (reachable) hub."""
        s = self.settings
        directory = local_or_hub(s.name_or_path, s.revision, "tokenizer")
        if directory is not None or hub_reachable():
            return directory
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s.name_or_path, revision=s.revision, cache_dir=s.cache_dir,
                                          local_files_only=True))
        except Exception as error:  # any miss in the local cache means the same thing here
            raise self._offline_error() from error

    def check(self) -> None:
        """The DataError loading would raise, where finding out downloads nothing: a local path that does
        not exist, or a hub id neither reachable nor in the local cache."""
        self._directory()

    def _from_pretrained(self) -> Any:
        s = self.settings
        directory = self._directory()
        from transformers import AutoTokenizer

        if directory is None:
            try:
                return AutoTokenizer.from_pretrained(s.name_or_path, revision=s.revision, cache_dir=s.cache_dir)
            except Exception as error:  # the remedy is the same whatever failed
                raise DataError(f"tokenizer 'gpt2': cannot load {s.name_or_path} ({one_line(error)}); set "
                                f"tokenizer.name_or_path to a local GPT-2 tokenizer directory") from error
        with hub_offline():
            try:
                return AutoTokenizer.from_pretrained(str(directory))
            except Exception as error:  # the remedy is the same whatever failed
                raise DataError(f"tokenizer 'gpt2': {directory} holds no usable tokenizer "
                                f"({one_line(error)}); it needs tokenizer.json, or vocab.json and "
                                f"merges.txt") from error

    def load(self, train_texts: Sequence[str], cache_dir: Path) -> HFTokenizer:
        raw = self._from_pretrained()
        if not getattr(raw, "is_fast", False):
            raise DataError(f"tokenizer 'gpt2': {self.settings.name_or_path} gave a slow tokenizer; "
                            f"the directory needs a tokenizer.json")
        tokenizer = HFTokenizer(raw)
        name, size, expected = self.settings.name_or_path, tokenizer.vocab_size, self.settings.expect_vocab
        # transformers builds an empty tokenizer, without complaint, from an unusable vocabulary
        if size <= 1 or not tokenizer.encode("The quick brown fox."):
            raise DataError(f"tokenizer 'gpt2': {name} loaded an empty vocabulary ({size} entries); "
                            f"check its tokenizer.json or vocab.json/merges.txt")
        if expected is not None and size != expected:
            raise DataError(f"tokenizer 'gpt2': {name} has {size} tokens, expected {expected}; "
                            f"set tokenizer.expect_vocab = {size} if that is intended")
        return tokenizer
