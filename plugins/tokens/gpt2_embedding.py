"""The `gpt2` embedding: the pretrained `wte` table (spec §2.1), read alone from model.safetensors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from newllm_kit.errors import DataError
from newllm_kit.registry import one_line

from ..hub import hub_reachable, local_or_hub

if TYPE_CHECKING:  # torch loads only when the component is used
    import torch

WTE_KEYS = ("wte.weight", "transformer.wte.weight")  # hub checkpoint / GPT2LMHeadModel.save_pretrained


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
            reason = "offline or not cached" if not online else one_line(error)
            raise DataError(f"embedding 'gpt2': cannot load {s.name_or_path} ({reason}); set "
                            f"embedding.name_or_path to a local GPT-2 directory, or "
                            f'embedding.source = "random"') from error

    def check(self) -> None:
        """The DataError loading would raise, where finding out downloads nothing: a local directory
        without model.safetensors, or a hub id neither reachable nor in the local cache."""
        s = self.settings
        if local_or_hub(s.name_or_path, s.revision, "embedding") is not None or not hub_reachable():
            read_wte(self._file(), header_only=True)  # the header only: its values are checked when loaded

    def table(self) -> torch.Tensor:
        """The float32 wte table as stored, loaded once."""
        if self._table is None:
            self._table = read_wte(self._file())
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


def read_wte(path: Path, header_only: bool = False) -> torch.Tensor:
    """The float32 wte table of a model.safetensors, or a DataError naming the file: a damaged file (a
    header that does not parse, offsets beyond its end), no wte table, or a table with NaN/inf values,
    which no trained GPT-2 has and which would otherwise surface as a non-finite loss mid-run. With
    `header_only`, opening the file (parsing its header) and finding the table is all: cheap enough for
    `validate`."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            key = next((k for k in WTE_KEYS if k in handle.keys()), None)
            if key is None:
                raise DataError(f"embedding 'gpt2': {path} has no token-embedding table "
                                f"(looked for {', '.join(WTE_KEYS)})")
            table = torch.empty(0) if header_only else handle.get_tensor(key).float().contiguous()
    except DataError:
        raise
    except Exception as error:  # safetensors' own error for a damaged file, or an OSError reading it
        raise DataError(f"embedding 'gpt2': {path} is not a readable safetensors file ({one_line(error)}); "
                        f"download it again or point embedding.name_or_path at an intact copy") from error
    bad = int((~torch.isfinite(table)).sum())
    if bad:
        raise DataError(f"embedding 'gpt2': {path}: {bad:,} of {table.numel():,} values of its wte table are "
                        f"NaN or infinite; the file is damaged: download it again or point "
                        f"embedding.name_or_path at an intact copy")
    return table
