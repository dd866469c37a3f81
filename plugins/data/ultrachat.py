"""Data source `ultrachat`: the reference corpus (spec §1.1), from the hub or a local copy.

Rows are read in dataset order and addressed by index, as in every reported experiment. A local
copy (`data.path`: a parquet or jsonl file, or a directory of them, in the ultrachat_200k schema
`prompt`, `prompt_id`, `messages: [{content, role}]`) goes through the same `datasets` loader as
the hub, so both give the same documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.corpus import jsonl_rows
from newllm_kit.errors import DataError
from newllm_kit.registry import one_line

from ..hub import hub_offline, hub_reachable

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
FULL_HASH_LIMIT = 256 << 20  # bigger files: size + first and last MiB
MIB = 1 << 20
SAMPLE_ROWS = 8  # rows whose text enters the fingerprint, a check that the content is the same


def _may_be_cached(dataset: str, cache_dir: str | None) -> bool:
    """Whether an offline `load_dataset` could find anything: a `datasets` (Arrow) cache entry or a
    hub download of `dataset`, or a non-empty `cache_dir`. False only when none of them exists."""
    from huggingface_hub import constants

    if cache_dir is not None and Path(cache_dir).is_dir() and any(Path(cache_dir).iterdir()):
        return True
    arrow_root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return ((arrow_root / dataset.replace("/", "___")).exists()
            or (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").exists())


class UltraChatSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        description="Local parquet/jsonl file, or a directory of them, in the ultrachat_200k schema; "
                    "unset: load `dataset` from the hub.")
    dataset: str = Field(
        default="HuggingFaceH4/ultrachat_200k", description="Hub dataset id (when `path` is unset).")
    split: str = Field(
        default="train_sft", description="Hub split; in a directory, files named '<split>-…' if any.")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit); unset: main.")
    cache_dir: str | None = Field(
        default=None, description="`datasets` cache directory (default: its own).")


def _file_digest(path: Path) -> str:
    """sha256 of the bytes; for very large files of the size and the first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(MIB), b""):
                digest.update(chunk)
        else:
            digest.update(handle.read(MIB))
            handle.seek(size - MIB)
            digest.update(handle.read(MIB))
    return digest.hexdigest()


def _corrupt_parquet(path: Path, error: Exception) -> DataError:
    return DataError(f"data source 'ultrachat': {path}: not a readable parquet file ({one_line(error)}); "
                     f"download or export it again")


def _columns(path: Path) -> list[str]:
    """Column names of a parquet file (its schema) or of a jsonl file (its first row)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as error:
            raise _corrupt_parquet(path, error) from None
    for _, row in jsonl_rows(path, "ultrachat"):
        return list(row) if isinstance(row, dict) else []
    return []


def _check_readable(files: list[Path]) -> None:
    """After `datasets` failed on a local copy: a DataError naming the first corrupt file, or the file
    and line of the first bad JSON row (the loader's own error names neither)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        if path.suffix == ".parquet":
            try:
                parquet = pq.ParquetFile(path)
                for group in range(parquet.num_row_groups):
                    parquet.read_row_group(group, columns=["messages"])
            except (pa.ArrowException, OSError) as error:
                raise _corrupt_parquet(path, error) from None
            continue
        for number, row in jsonl_rows(path, "ultrachat"):
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise DataError(f"data source 'ultrachat': {path}:{number}: expected an object with a "
                                f"'messages' list (ultrachat_200k schema); fix or remove that line")


class UltraChat:
    """`documents(rows)` gives each row's message contents, in turn order."""

    def __init__(self, settings: UltraChatSettings | None = None) -> None:
        self.settings = settings if settings is not None else UltraChatSettings()
        self._messages: Any = None
        self._fingerprint: str | None = None

    def files(self) -> list[Path]:
        """The local files `path` names, in name order; only `<split>-…` ones when a directory has them."""
        if self.settings.path is None:
            return []
        root = Path(self.settings.path).expanduser()
        if root.is_file():
            if root.suffix not in BUILDERS:
                raise DataError(f"data source 'ultrachat': data.path {root} is not a .parquet or .jsonl file")
            found = [root]
        elif root.is_dir():
            found = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in BUILDERS
                            and not p.name.startswith(".")), key=lambda p: p.relative_to(root).as_posix())
            split = self.settings.split
            of_split = [p for p in found if p.name.startswith((f"{split}-", f"{split}."))]
            found = of_split or found
        else:
            raise DataError(f"data source 'ultrachat': data.path {root} does not exist; set it to a local "
                            f"parquet/jsonl copy of ultrachat_200k")
        if not found:
            raise DataError(f"data source 'ultrachat': data.path {root} holds no .parquet or .jsonl files")
        if len({BUILDERS[p.suffix] for p in found}) > 1:
            raise DataError(f"data source 'ultrachat': data.path {root} mixes parquet and jsonl files; "
                            f"keep one format")
        for path in found:
            if "messages" not in (columns := _columns(path)):
                raise DataError(f"data source 'ultrachat': {path}: missing column 'messages' (has: "
                                f"{', '.join(columns) or 'none'}); expected prompt, prompt_id, messages")
        return found

    def check(self) -> None:
        """The DataError loading would raise, where finding out downloads nothing: a data.path without
        ultrachat files, or a hub dataset neither reachable nor in the local cache."""
        s = self.settings
        if s.path is not None:
            self.files()
        elif not hub_reachable() and not _may_be_cached(s.dataset, s.cache_dir):
            raise DataError(self._cannot_load())

    def _load(self) -> Any:
        s = self.settings
        online = s.path is None and hub_reachable()
        if s.path is None and not online and not _may_be_cached(s.dataset, s.cache_dir):
            raise DataError(self._cannot_load())  # at once: importing datasets alone takes ~1.5 s
        import datasets

        if s.path is not None:
            files = self.files()
            was_enabled, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
            datasets.disable_progress_bars()  # noise for a local copy, which loads in about a second
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become ours, in one line
            try:
                dataset = datasets.load_dataset(BUILDERS[files[0].suffix], data_files=[str(p) for p in files],
                                                split="train", cache_dir=s.cache_dir)
            except Exception as error:
                _check_readable(files)
                raise DataError(f"data source 'ultrachat': cannot read {s.path} ({one_line(error)}); "
                                f"check that it is in the ultrachat_200k schema") from error
            finally:
                datasets.logging.set_verbosity(verbosity)
                if was_enabled:
                    datasets.enable_progress_bars()
        else:
            try:
                with nullcontext() if online else hub_offline():
                    dataset = datasets.load_dataset(s.dataset, split=s.split, revision=s.revision,
                                                    cache_dir=s.cache_dir)
            except Exception as error:  # offline miss, missing split, network failure: same remedy
                raise DataError(self._cannot_load(one_line(error) if online else None)) from error
            if "messages" not in dataset.column_names:
                raise DataError(f"data source 'ultrachat': {s.dataset} split {s.split} has no column "
                                f"'messages' (has: {', '.join(dataset.column_names)})")
        return dataset.select_columns(["messages"])

    def _cannot_load(self, reason: str | None = None) -> str:
        return (f"data source 'ultrachat': cannot load {self.settings.dataset} ({reason or 'offline or not cached'}); "
                f'set data.path to a local parquet/jsonl copy, or data.source = "embedded"')

    def _dataset(self) -> Any:
        if self._messages is None:
            self._messages = self._load()
        return self._messages

    def size(self) -> int:
        return len(self._dataset())

    def documents(self, rows: Sequence[int]) -> list[list[str]]:
        dataset = self._dataset()
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < len(dataset)]
        if bad:
            raise DataError(f"data source 'ultrachat': row {bad[0]} requested but the corpus has "
                            f"{len(dataset)} rows")
        if not rows:
            return []
        docs = []
        for row, messages in zip(rows, dataset[rows]["messages"], strict=True):
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
            ):
                raise DataError(f"data source 'ultrachat': row {row}: 'messages' must be a list of "
                                f"{{content, role}} with string content")
            docs.append([m["content"] for m in messages])
        return docs

    def fingerprint(self) -> str:
        """sha256 of where the rows come from (hub id, split, revision; or the local files' names and
        contents, not their location), the row count and the text of a few rows."""
        if self._fingerprint is None:
            s = self.settings
            n = self.size()
            sample = sorted({*range(min(SAMPLE_ROWS, n)), n - 1})
            payload: dict[str, Any] = {"source": "ultrachat", "rows": n, "sample": self.documents(sample)}
            if s.path is None:
                payload |= {"dataset": s.dataset, "split": s.split, "revision": s.revision}
            else:
                root = Path(s.path).expanduser()
                base = root if root.is_dir() else root.parent
                payload["files"] = [[p.relative_to(base).as_posix(), _file_digest(p)] for p in self.files()]
            self._fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        s = self.settings
        where = {"path": s.path} if s.path is not None else {"dataset": s.dataset, "revision": s.revision}
        return {**where, "split": s.split, "rows": self.size()}


@hookimpl
def register_data_sources(register: Any) -> None:
    register("ultrachat", UltraChat, settings=UltraChatSettings,
             description="HuggingFaceH4/ultrachat_200k (hub or local parquet/jsonl), rows in dataset order")
