"""`ngram-mlp`: a neural n-gram language model, trained by the `lm` recipe (its `default_recipe`).

Each prediction reads the embeddings of the current token and the `order − 1` before it, concatenated,
through one hidden layer, and is scored by a head tied to the token-embedding table. It implements
`newllm_kit_plugins.lm.AutoregressiveModel` as a recurrent model (`block_size = None`): its state is the
last `order − 1` ids, so the lm recipe can evaluate a stream segment by segment and still give every
position its full n-gram.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

NO_TOKEN = -1  # a state slot before the stream start: its embedding counts as zeros


class NGramMLPSettings(BaseModel):
    """The `[[models]]` keys of `architecture = "ngram-mlp"`."""

    model_config = ConfigDict(extra="forbid")

    order: int = Field(3, ge=1, le=64, description="Tokens each prediction reads, the current one included.")
    embedding_dim: int = Field(16, ge=1, le=1 << 16, description="Token embedding width.")
    hidden_size: int = Field(64, ge=1, le=1 << 16, description="Width of the hidden layer.")


class NGramMLP(nn.Module):
    block_size: int | None = None  # reads inputs of any length, carrying its state between them

    def __init__(self, settings: NGramMLPSettings, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.embedding_dim, self.order = vocab_size, settings.embedding_dim, settings.order
        self.embedding = nn.Embedding(vocab_size, settings.embedding_dim)
        self.mlp = nn.Sequential(nn.Linear(settings.order * settings.embedding_dim, settings.hidden_size), nn.Tanh(),
                                 nn.Linear(settings.hidden_size, settings.embedding_dim))

    def hidden(self, ids: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, t] ids and the previous `order − 1` ids (None: the stream starts here) -> ([b, t, E] states
        for the tied head, the last `order − 1` ids as the next call's state)."""
        if state is None:
            state = ids.new_full((ids.shape[0], self.order - 1), NO_TOKEN)
        history = torch.cat([state, ids], dim=1)
        vectors = self.embedding(history.clamp(min=0)) * (history != NO_TOKEN).unsqueeze(-1)
        grams = vectors.unfold(1, self.order, 1).transpose(2, 3).flatten(2)  # [b, t, order·E], oldest first
        return self.mlp(grams), history[:, history.shape[1] - (self.order - 1):]

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
        self.embedding.weight.requires_grad_(not freeze)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The lm recipe trains "train": every parameter that requires a gradient, so an unfrozen
        table ([embedding] freeze = false) is trained with the rest."""
        return {"train": [p for p in self.parameters() if p.requires_grad]}

    def param_counts(self) -> dict[str, int]:
        counts = {"embedding": self.embedding.weight.numel(), "mlp": sum(p.numel() for p in self.mlp.parameters()),
                  "head": 0}
        return {**counts, "total": sum(counts.values())}


class NGramMLPArchitecture:
    default_recipe = "lm"

    def __init__(self, settings: NGramMLPSettings) -> None:
        self.settings = settings

    @property
    def embedding_dim(self) -> int:
        return self.settings.embedding_dim

    def build(self, vocab_size: int) -> NGramMLP:
        return NGramMLP(self.settings, vocab_size)
