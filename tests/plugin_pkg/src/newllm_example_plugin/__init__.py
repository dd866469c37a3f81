"""Example third-party plugin: architecture `tanh-rnn` and metric `bits_per_token`.

Uses only the public plugin API: `newllm_kit.hookimpl`, the `register` callback and the
contracts in `newllm_kit.protocols`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit import hookimpl
from newllm_kit.protocols import EvalOutputs


class TanhRNNSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context_dim: int = Field(32, ge=1, description="Width of the recurrent context.")
    embedding_dim: int = Field(16, ge=1, description="Token embedding width.")


class TanhContextBlock(nn.Module):
    """F(c, x) = tanh(W_c c + W_x x + b): one layer, so one context output."""

    def __init__(self, context_dim: int, token_dim: int) -> None:
        super().__init__()
        self.context = nn.Linear(context_dim, context_dim, bias=False)
        self.token = nn.Linear(token_dim, context_dim)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
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
        return self.embedding(ids)

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.token_block(torch.cat([layer_contexts[-1], tokens], dim=-1)))

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
        self.embedding.weight.requires_grad_(not freeze)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        phase2 = list(self.token_block.parameters())
        if self.embedding.weight.requires_grad:
            phase2.append(self.embedding.weight)
        return {"phase1": list(self.context_block.parameters()), "phase2": phase2}

    def param_counts(self) -> dict[str, int]:
        def size(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {"context_block": size(self.context_block), "token_block": size(self.token_block),
                  "embedding": size(self.embedding), "head": 0}
        return {**counts, "total": sum(counts.values())}


class TanhRNNArchitecture:
    def __init__(self, settings: TanhRNNSettings) -> None:
        self.settings = settings

    @property
    def embedding_dim(self) -> int:
        return self.settings.embedding_dim

    def build(self, vocab_size: int) -> nn.Module:
        return TanhRNN(self.settings, vocab_size)


class BitsPerToken:
    name, direction, unit = "bits_per_token", "min", "bits"

    def __init__(self, settings: Any) -> None:
        pass

    def compute(self, outputs: EvalOutputs) -> float:
        return outputs.nll_sum / max(outputs.count, 1) / math.log(2)


@hookimpl
def register_architectures(register: Any) -> None:
    register("tanh-rnn", TanhRNNArchitecture, settings=TanhRNNSettings,
             description="one-layer tanh recurrent context block (example plugin)")


@hookimpl
def register_metrics(register: Any) -> None:
    register("bits_per_token", BitsPerToken, description="mean negative log2-likelihood per token")
