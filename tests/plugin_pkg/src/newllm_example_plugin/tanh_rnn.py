"""`tanh-rnn`: a CVFP-shaped architecture, trained by the cvfp recipe (its `default_recipe`).

It implements `newllm_kit_plugins.cvfp.contract.CVFPModel`: a one-layer ContextBlock whose fixed point
Phase 1 finds, and a TokenBlock that Phase 2 trains on the frozen contexts.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class TanhRNNSettings(BaseModel):
    """The `[[models]]` keys of `architecture = "tanh-rnn"`."""

    model_config = ConfigDict(extra="forbid")

    context_dim: int = Field(32, ge=1, le=1 << 16, description="Width of the recurrent context.")
    embedding_dim: int = Field(16, ge=1, le=1 << 16, description="Token embedding width.")


class TanhContextBlock(nn.Module):
    """F(c, x) = tanh(W_c c + W_x x + b): one layer, so one context output."""

    def __init__(self, context_dim: int, token_dim: int) -> None:
        super().__init__()
        self.context = nn.Linear(context_dim, context_dim, bias=False)
        self.token = nn.Linear(token_dim, context_dim)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, T] token inputs (embedded tokens, not ids) -> [n, C]: the token half of F, done once per stream."""
        return self.token(tokens)

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tanh(self.context(context) + projected)]


class TanhRNN(nn.Module):
    def __init__(self, settings: TanhRNNSettings, vocab_size: int) -> None:
        super().__init__()
        c, e = settings.context_dim, settings.embedding_dim
        self.context_dim, self.embedding_dim, self.vocab_size = c, e, vocab_size
        self.token_width, self.layer_widths = e, (c,)
        self.embedding = nn.Embedding(vocab_size, e)
        self.context_block = TanhContextBlock(c, e)
        self.token_block = nn.Linear(c + e, e)

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] ids -> [n, E]: each token's embedding (one token per input, so nothing before the start)."""
        return self.embedding(ids.long())

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.token_block(torch.cat([layer_contexts[-1], tokens], dim=-1)))

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
        self.embedding.weight.requires_grad_(not freeze)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Phase 1 trains the ContextBlock, Phase 2 the TokenBlock, and the table too when it is not
        frozen: a trainable parameter left out of every group would be refused by the core."""
        phase2 = [p for m in (self.token_block, self.embedding) for p in m.parameters() if p.requires_grad]
        return {"phase1": list(self.context_block.parameters()), "phase2": phase2}

    def param_counts(self) -> dict[str, int]:
        def size(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {"context_block": size(self.context_block), "token_block": size(self.token_block),
                  "embedding": size(self.embedding), "head": 0}
        return {**counts, "total": sum(counts.values())}


class TanhRNNArchitecture:
    default_recipe = "cvfp"

    def __init__(self, settings: TanhRNNSettings) -> None:
        self.settings = settings

    @property
    def embedding_dim(self) -> int:
        return self.settings.embedding_dim

    def build(self, vocab_size: int) -> TanhRNN:
        return TanhRNN(self.settings, vocab_size)
