"""The `gru` architecture: a stacked-GRU language-model baseline, trained by the `lm` recipe.

Embedding, `layers` GRU layers of `hidden_size`, a projection back to the embedding width when the
two differ, and a head tied to the token-embedding table. It is recurrent: it carries its state
through a stream, so its context is unbounded (`block_size` None), as a CVFP model's is.

Presets match the v2 CVFP models by *trainable* parameters (everything but a frozen GPT-2 table),
with embedding_dim = 768 and 4 layers (the closest depth of 1–6 for both); the hidden size
minimises the gap:

=========  ===========  ================================  ==========================
preset     hidden_size  trainable                         CVFP v2 (gradual-reduction)
=========  ===========  ================================  ==========================
``v2-A``   997          23,964,741 (+4,165)               6L-768: 23,960,576
``v2-B``   1,055        26,643,645 (+7,613)               3L-1536: 26,636,032
=========  ===========  ================================  ==========================
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl
from newllm_kit.params import load_table
from newllm_kit.presets import PresetSettings

MAX_WIDTH = 1 << 20
PRESETS: dict[str, dict[str, int]] = {
    "v2-A": {"embedding_dim": 768, "hidden_size": 997, "layers": 4},
    "v2-B": {"embedding_dim": 768, "hidden_size": 1055, "layers": 4},
}


class GRUSettings(PresetSettings):
    """The `[[models]]` keys of `architecture = "gru"`."""

    model_config = ConfigDict(extra="forbid")
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: Literal["v2-A", "v2-B"] | None = Field(
        default=None, description="Sizes matching the trainable parameters of CVFP v2 model A (6L-768) or "
                                  "B (3L-1536) with a frozen 768-wide table; explicit keys win.")
    embedding_dim: int = Field(default=768, ge=1, le=MAX_WIDTH,
                               description="Token-embedding width (768 for GPT-2 wte).")
    hidden_size: int = Field(default=1024, ge=1, le=MAX_WIDTH, description="Width of each GRU layer's state.")
    layers: int = Field(default=2, ge=1, le=1024, description="Stacked GRU layers.")
    dropout: float = Field(default=0.0, ge=0, lt=1,
                           description="Dropout on the embeddings, between GRU layers and on the output; 0: at "
                                       "the baselines' size 0.1 only slowed training (README, \"Baselines\"); "
                                       "raise it for a model much larger than its data.")


class GRUModel(nn.Module):
    """Embedding -> LayerNorm -> GRU stack -> (projection) -> LayerNorm -> head tied to the table
    (`newllm_kit_plugins.lm.AutoregressiveModel`). The state is the GRU's [layers, b, hidden_size]."""

    block_size: int | None = None  # recurrent: no longest context

    def __init__(self, cfg: GRUSettings, vocab_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.embedding_dim = vocab_size, cfg.embedding_dim
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        # LayerNorms at both ends, as CVFP normalises its token inputs and GPT-2 its final states: a table
        # of std 0.02 (random, or tied and trained) otherwise leaves a deep GRU's input and its logits so
        # small that it stalls at the unigram (measured: 3 layers, PPL 426 against 396 for unigram).
        self.embed_norm = nn.LayerNorm(cfg.embedding_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.rnn = nn.GRU(cfg.embedding_dim, cfg.hidden_size, cfg.layers, batch_first=True,
                          dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.proj = nn.Linear(cfg.hidden_size, cfg.embedding_dim) if cfg.hidden_size != cfg.embedding_dim else None
        self.norm = nn.LayerNorm(cfg.embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)  # the GRU and projection keep torch's default init

    def hidden(self, ids: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, t] ids and the state after the previous tokens (None: zeros) -> ([b, t, E], new state)."""
        out, state = self.rnn(self.dropout(self.embed_norm(self.embedding(ids))), state)
        out = self.dropout(out)
        return self.norm(out if self.proj is None else self.proj(out)), state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, t] ids -> [b, t, V] logits (whole; the lm recipe computes its loss in vocabulary chunks)."""
        return F.linear(self.hidden(ids)[0], self.embedding.weight)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        """Load a [V, E] table (GPT-2 wte or a seeded random one); frozen tables get no gradient."""
        load_table(self.embedding.weight, weight, trainable=not freeze)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Everything trainable: the token table only when it is not frozen."""
        return {"train": [p for p in self.parameters() if p.requires_grad]}

    def param_counts(self) -> dict[str, int]:
        """embedding (token table), gru, projection, norms (input and output LayerNorms), head (0: tied), total."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        counts = {"embedding": count(self.embedding), "gru": count(self.rnn), "projection": count(self.proj),
                  "norms": count(self.embed_norm) + count(self.norm), "head": 0}
        return {**counts, "total": sum(counts.values())}

    def flops_per_token(self, context: int) -> int:
        """Forward matmul FLOPs of one token (`newllm_kit.flops`): each layer's three gates read its input
        and its state, 2·3·hidden·(input + hidden); the projection 2·hidden·E where there is one; the tied
        head 2·E·V. A recurrent model's cost does not depend on `context`."""
        gates = sum(p.numel() for name, p in self.rnn.named_parameters() if name.startswith("weight_"))
        projection = 0 if self.proj is None else self.proj.weight.numel()
        return 2 * (gates + projection) + 2 * self.embedding_dim * self.vocab_size


class GRUArchitecture:
    """The `gru` architecture factory: validated settings in, `build(vocab_size)` a fresh model."""

    default_recipe = "lm"

    def __init__(self, settings: GRUSettings | None = None) -> None:
        self.settings = settings if settings is not None else GRUSettings()

    @property
    def embedding_dim(self) -> int:
        return self.settings.embedding_dim

    def build(self, vocab_size: int) -> GRUModel:
        return GRUModel(self.settings, vocab_size)


@hookimpl
def register_architectures(register: Any) -> None:
    register("gru", GRUArchitecture, settings=GRUSettings,
             description="stacked-GRU baseline carrying its state through the stream (tied head; lm recipe)")
