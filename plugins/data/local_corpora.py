"""Corpora that need no download: `text` (your own files) and `embedded` (shipped with Python).

`embedded` reads the interactive-help topics of the running interpreter (`pydoc_data.topics`,
real English prose about Python) at run time, so any machine can run an experiment end to end;
its fingerprint changes with the Python version, which the run records.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.corpus import jsonl_rows, read_text, texts_sha256
from newllm_kit.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")
MIN_WORDS = 20  # shorter help paragraphs are headings, signatures or cross-references
BLANK_LINES = re.compile(r"\n[ \t]*\n")


def paragraphs(text: str) -> list[str]:
    """Non-empty blocks separated by blank lines, stripped."""
    blocks = BLANK_LINES.split(text.replace("\r\n", "\n"))
    return [block.strip() for block in blocks if block.strip()]


class DocumentList:
    """A corpus read once into memory; subclasses say how (`_read`) and what to call it (`name`)."""

    name = "documents"

    def __init__(self) -> None:
        self._cache: list[list[str]] | None = None

    def _read(self) -> list[list[str]]:
        raise NotImplementedError

    def all_documents(self) -> list[list[str]]:
        if self._cache is None:
            docs = self._read()
            if not docs:
                raise DataError(f"data source {self.name!r}: the corpus holds no documents")
            self._cache = docs
        return self._cache

    def size(self) -> int:
        return len(self.all_documents())

    def documents(self, rows: Sequence[int]) -> list[list[str]]:
        docs = self.all_documents()
        bad = [r for r in rows if not 0 <= r < len(docs)]
        if bad:
            raise DataError(f"data source {self.name!r}: row {bad[0]} requested but the corpus has "
                            f"{len(docs)} rows")
        return [list(docs[r]) for r in rows]


class TextSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        ..., min_length=1,
        description="Files, in order: .txt (each blank-line-separated block is one document) or .jsonl "
                    "(each line {\"text\": …} or {\"messages\": [{\"content\", \"role\"}, …]}); a directory "
                    "means its .txt/.jsonl files in name order.")


def _jsonl_document(row: Any, where: str) -> list[str]:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return [row["text"]]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                          for m in messages):
        return [m["content"] for m in messages]
    raise DataError(f"data source 'text': {where}: expected an object with 'text' (a string) or 'messages' "
                    f"(a list of {{content, role}})")


class TextFiles(DocumentList):
    """The `text` source: local .txt and .jsonl files, documents in file and line order."""

    name = "text"

    def __init__(self, settings: TextSettings) -> None:
        super().__init__()
        self.settings = settings

    def files(self) -> list[Path]:
        found: list[Path] = []
        for entry in self.settings.paths:
            path = Path(entry).expanduser()
            if path.is_dir():
                found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES))
            elif path.is_file() and path.suffix in TEXT_SUFFIXES:
                found.append(path)
            elif path.exists():
                raise DataError(f"data source 'text': {path}: unsupported file type; data.paths takes "
                                f".txt or .jsonl files")
            else:
                raise DataError(f"data source 'text': {path} does not exist; set data.paths to .txt or "
                                f".jsonl files")
        return found

    def check(self) -> None:
        """A path in data.paths that does not exist (or is not .txt/.jsonl), before any file is read."""
        self.files()

    def _read(self) -> list[list[str]]:
        docs: list[list[str]] = []
        for path in self.files():
            if path.suffix == ".txt":
                docs.extend([block] for block in paragraphs(read_text(path, self.name)))
            else:
                docs.extend(_jsonl_document(row, f"{path}:{number}") for number, row in jsonl_rows(path, self.name))
        return docs

    def fingerprint(self) -> str:
        """Hash of the files' bytes in order (and their kinds), not of their names or locations."""
        digest = hashlib.sha256()
        for path in self.files():
            data = path.read_bytes()
            digest.update(f"{path.suffix}:{len(data)}:".encode())
            digest.update(data)
        return digest.hexdigest()


class Embedded(DocumentList):
    """The `embedded` source: paragraphs (≥ 20 words) of Python's help topics, topics in name order."""

    name = "embedded"

    def __init__(self, settings: None = None) -> None:
        super().__init__()

    def _read(self) -> list[list[str]]:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise DataError('data source \'embedded\': this Python installation lacks pydoc_data; set '
                            'data.source = "text" with your own files') from None
        return [[p] for key in sorted(topics) for p in paragraphs(topics[key]) if len(p.split()) >= MIN_WORDS]

    def fingerprint(self) -> str:
        return texts_sha256([doc[0] for doc in self.all_documents()])

    def describe(self) -> dict[str, Any]:
        return {"corpus": "pydoc_data.topics", "python": platform.python_version(), "documents": self.size()}


@hookimpl
def register_data_sources(register: Any) -> None:
    register("text", TextFiles, settings=TextSettings,
             description="local .txt (blank-line blocks) and .jsonl (text or messages) files")
    register("embedded", Embedded,
             description="paragraphs of Python's own help topics (pydoc_data), read at run time")
