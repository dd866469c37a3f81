"""GPT-2: the reference tokenizer (spec §1.1) and its pretrained `wte` table (spec §2.1).

Both accept a hub name (`gpt2`) or a local directory. Without network the hub libraries retry
for half a minute before failing, so `hub_reachable` probes the endpoint first and, when it is
unreachable, only the local hub cache is consulted; a miss fails at once with one line that
says which key to set instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.errors import DataError

if TYPE_CHECKING:  # torch and the hub libraries load only when a component is used
    import torch

GPT2_VOCAB = 50257
WTE_KEYS = ("wte.weight", "transformer.wte.weight")  # hub checkpoint / GPT2LMHeadModel.save_pretrained
PROBE_SECONDS = 2.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """False under HF_HUB_OFFLINE, or when the hub endpoint (or the HTTPS proxy) refuses a TCP
    connection within `timeout` seconds; the probe runs in a daemon thread so a hanging DNS
    lookup cannot stall the caller."""
    from huggingface_hub import constants

    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE:
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host is None:
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for hub libraries that are already imported: they read HF_HUB_OFFLINE once,
    at import, into module constants, so those constants are switched for the duration."""
    from huggingface_hub import constants

    modules: list[Any] = [constants]
    if "datasets.config" in sys.modules:  # importing it just to patch it would cost seconds
        modules.append(sys.modules["datasets.config"])
    saved = [module.HF_HUB_OFFLINE for module in modules]
    try:
        for module in modules:
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.HF_HUB_OFFLINE = value


def local_dir(name_or_path: str, key: str) -> Path | None:
    """The directory `name_or_path` names, None for a hub repo id, DataError for a missing path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{key}: {path} is a file; point it at the directory that holds the GPT-2 files")
    # a hub id is "name" or "owner/name"; anything else was meant as a path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise DataError(f"{key}: directory {path} does not exist; point it at a local GPT-2 directory")
    return None


def local_or_hub(name_or_path: str, revision: str | None, section: str) -> Path | None:
    """`local_dir` of `{section}.name_or_path`; a revision names a hub commit, so it cannot go with a directory."""
    directory = local_dir(name_or_path, f"{section}.name_or_path")
    if directory is not None and revision is not None:
        raise DataError(f"{section}.revision = {revision!r} applies to a hub repo id, but {section}.name_or_path is "
                        f"the local directory {directory}; remove {section}.revision")
    return directory


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


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

    def _from_pretrained(self) -> Any:
        s = self.settings
        directory = self._directory()
        from transformers import AutoTokenizer

        if directory is None:
            try:
                return AutoTokenizer.from_pretrained(s.name_or_path, revision=s.revision, cache_dir=s.cache_dir)
            except Exception as error:  # the remedy is the same whatever failed
                raise DataError(f"tokenizer 'gpt2': cannot load {s.name_or_path} ({first_line(error)}); set "
                                f"tokenizer.name_or_path to a local GPT-2 tokenizer directory") from error
        with hub_offline():
            try:
                return AutoTokenizer.from_pretrained(str(directory))
            except Exception as error:  # the remedy is the same whatever failed
                raise DataError(f"tokenizer 'gpt2': {directory} holds no usable tokenizer "
                                f"({first_line(error)}); it needs tokenizer.json, or vocab.json and "
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


class GPT2EmbeddingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        default="gpt2", validation_alias=AliasChoices("name_or_path", "path"),
        description="Hub repo id, or a local directory with model.safetensors (alias: path).")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of a hub repo id; unset: main.")
    cache_dir: str | None = Field(
        default=None, description="Hub download cache (default: huggingface_hub's).")


class GPT2Embedding:
    """The pretrained token-embedding table `wte`, read alone from model.safetensors."""

    def __init__(self, settings: GPT2EmbeddingSettings | None = None) -> None:
        self.settings = settings if settings is not None else GPT2EmbeddingSettings()
        self._table: torch.Tensor | None = None
        self._fingerprint: str | None = None

    def _file(self) -> Path:
        s = self.settings
        directory = local_or_hub(s.name_or_path, s.revision, "embedding")
        if directory is not None:
            path = directory / "model.safetensors"
            if not path.is_file():
                raise DataError(f"embedding 'gpt2': {directory} has no model.safetensors; point "
                                f"embedding.name_or_path at a GPT-2 directory saved with safetensors")
            return path
        from huggingface_hub import hf_hub_download

        online = hub_reachable()
        try:
            return Path(hf_hub_download(s.name_or_path, "model.safetensors", revision=s.revision,
                                        cache_dir=s.cache_dir, local_files_only=not online))
        except Exception as error:  # offline miss, missing repo, network failure: the remedy is the same
            reason = "offline or not cached" if not online else first_line(error)
            raise DataError(f"embedding 'gpt2': cannot load {s.name_or_path} ({reason}); set "
                            f"embedding.name_or_path to a local GPT-2 directory, or "
                            f'embedding.source = "random"') from error

    def table(self) -> torch.Tensor:
        """The float32 wte table as stored, loaded once."""
        if self._table is None:
            from safetensors import safe_open

            path = self._file()
            with safe_open(str(path), framework="pt") as handle:
                key = next((k for k in WTE_KEYS if k in handle.keys()), None)
                if key is None:
                    raise DataError(f"embedding 'gpt2': {path} has no token-embedding table "
                                    f"(looked for {', '.join(WTE_KEYS)})")
                self._table = handle.get_tensor(key).float().contiguous()
        return self._table

    def load(self, vocab_size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
        table = self.table()
        if tuple(table.shape) != (vocab_size, dim):
            rows, cols = table.shape
            raise DataError(f"embedding 'gpt2': {self.settings.name_or_path} has a {rows}×{cols} wte table "
                            f"but the model needs {vocab_size}×{dim}; use this checkpoint's tokenizer and "
                            f'embedding_dim = {cols}, or set embedding.source = "random"')
        return table.clone()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.table().numpy().data).hexdigest()
        return self._fingerprint


@hookimpl
def register_tokenizers(register: Any) -> None:
    register("gpt2", GPT2TokenizerFactory, settings=GPT2TokenizerSettings,
             description="GPT-2 BPE (50257 tokens) from the hub or a local directory")


@hookimpl
def register_embeddings(register: Any) -> None:
    register("gpt2", GPT2Embedding, settings=GPT2EmbeddingSettings,
             description="pretrained GPT-2 wte table from model.safetensors (hub or local directory)")
