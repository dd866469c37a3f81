"""Embedding source `random`: the seed's fallback table, N(0, std²) (spec §2.1), from the given generator.

With `embedding.freeze = false` the table is trained like any other weight; the values depend
only on the experiment seed, so the fingerprint records the distribution, not the numbers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl


class RandomEmbeddingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    std: float = Field(default=0.02, gt=0, description="Standard deviation of the normal initialisation.")


class RandomEmbedding:
    def __init__(self, settings: RandomEmbeddingSettings | None = None) -> None:
        self.settings = settings if settings is not None else RandomEmbeddingSettings()

    def load(self, vocab_size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(vocab_size, dim, generator=generator) * self.settings.std

    def fingerprint(self) -> str:
        payload = {"source": "random", "distribution": "normal", "mean": 0.0, "std": self.settings.std}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@hookimpl
def register_embeddings(register: Any) -> None:
    register("random", RandomEmbedding, settings=RandomEmbeddingSettings,
             description="N(0, std²) table from the experiment seed (std 0.02)")
