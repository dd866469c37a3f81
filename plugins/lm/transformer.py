"""The `transformer` architecture: a GPT-2-style decoder baseline, trained by the `lm` recipe.

Learned positions, pre-LayerNorm blocks (causal self-attention, GELU MLP), a final LayerNorm and a
head tied to the token-embedding table. Init as GPT-2: normal(0, 0.02), with the residual
projections scaled by 1/√(2·n_layer) so the residual stream's variance does not grow with depth.

Presets match the v2 CVFP models by *trainable* parameters (everything but a frozen GPT-2 table),
with n_embd = 768, 12 heads, block_size = 1024 and 3 blocks; the MLP width minimises the gap:

=========  ==========  ================================  ==========================
preset     mlp_width   trainable                         CVFP v2 (gradual-reduction)
=========  ==========  ================================  ==========================
``v2-A``   3,486       23,960,538 (−38)                  6L-768: 23,960,576
``v2-B``   4,066       26,634,918 (−1,114)               3L-1536: 26,636,032
=========  ==========  ================================  ==========================
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from newllm_kit import hookimpl
from newllm_kit.flops import linear_flops
from newllm_kit.params import load_table
from newllm_kit.presets import PresetSettings

MAX_WIDTH = 1 << 20
PRESETS: dict[str, dict[str, int]] = {
    "v2-A": {"n_layer": 3, "n_head": 12, "n_embd": 768, "block_size": 1024, "mlp_width": 3486},
    "v2-B": {"n_layer": 3, "n_head": 12, "n_embd": 768, "block_size": 1024, "mlp_width": 4066},
}


class TransformerSettings(PresetSettings):
    """The `[[models]]` keys of `architecture = "transformer"`. Defaults are GPT-2 small's."""

    model_config = ConfigDict(extra="forbid")
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: Literal["v2-A", "v2-B"] | None = Field(
        default=None, description="Sizes matching the trainable parameters of CVFP v2 model A (6L-768) or "
                                  "B (3L-1536) with a frozen 768-wide table; explicit keys win.")
    n_layer: int = Field(default=12, ge=1, le=1024, description="Number of transformer blocks.")
    n_head: int = Field(default=12, ge=1, le=4096, description="Attention heads (must divide n_embd).")
    n_embd: int = Field(default=768, ge=1, le=MAX_WIDTH,
                        description="Model and token-embedding width (768 for GPT-2 wte).")
    block_size: int = Field(default=1024, ge=1, le=1 << 24, description="Longest context, in tokens.")
    mlp_width: int | None = Field(default=None, ge=1, le=MAX_WIDTH,
                                  description="Hidden width of each MLP (None: 4 × n_embd).")
    dropout: float = Field(default=0.0, ge=0, lt=1,
                           description="Dropout on embeddings, attention and residuals; 0: at the baselines' size "
                                       "0.1 only slowed training (README, \"Baselines\"); raise it for a model "
                                       "much larger than its data.")
    bias: bool = Field(default=True, description="Biases in the Linear layers and LayerNorms (GPT-2: true).")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerSettings:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; choose an n_head "
                             f"that divides it (e.g. 12 for 768)")
        return self

    @property
    def hidden_width(self) -> int:
        return self.mlp_width or 4 * self.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerSettings) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.residual_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = (part.view(b, t, self.n_head, e // self.n_head).transpose(1, 2)
                   for part in self.qkv(x).split(e, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.residual_dropout(self.proj(y.transpose(1, 2).reshape(b, t, e)))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerSettings) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.hidden_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)): pre-LayerNorm, as GPT-2."""

    def __init__(self, cfg: TransformerSettings) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerModel(nn.Module):
    """Token + position embeddings, `n_layer` blocks, final LayerNorm, head tied to the token table
    (`newllm_kit_plugins.lm.AutoregressiveModel`)."""

    def __init__(self, cfg: TransformerSettings, vocab_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.embedding_dim, self.block_size = vocab_size, cfg.n_embd, cfg.block_size
        self.embedding = nn.Embedding(vocab_size, cfg.n_embd)
        self.positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # the two residual projections of each block
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def hidden(self, ids: torch.Tensor, state: Any | None = None) -> tuple[torch.Tensor, None]:
        """[b, t] ids (t ≤ block_size) -> ([b, t, E] final-LayerNorm states, None): attention keeps no state."""
        t = ids.shape[1]
        if t > self.block_size:
            raise ValueError(f"input of {t} tokens is longer than block_size {self.block_size}")
        x = self.dropout(self.embedding(ids) + self.positions(torch.arange(t, device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.norm(x), None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, t] ids -> [b, t, V] logits (whole; the lm recipe computes its loss in vocabulary chunks)."""
        return F.linear(self.hidden(ids)[0], self.embedding.weight)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        """Load a [V, E] table (GPT-2 wte or a seeded random one); frozen tables get no gradient."""
        load_table(self.embedding.weight, weight, trainable=not freeze)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Everything trainable: the token table only when it is not frozen (positions always)."""
        return {"train": [p for p in self.parameters() if p.requires_grad]}

    def param_counts(self) -> dict[str, int]:
        """embedding (token table), positions, blocks (with the final LayerNorm), head (0: tied), total."""
        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        counts = {"embedding": count(self.embedding), "positions": count(self.positions),
                  "blocks": count(self.blocks, self.norm), "head": 0}
        return {**counts, "total": sum(counts.values())}

    def flops_per_token(self, context: int) -> int:
        """Forward matmul FLOPs of one token reading `context` tokens (`newllm_kit.flops`): 2 × every Linear
        weight of the blocks; per layer 2·2·context·n_embd for the attention scores and their weighted sum
        over all `context` keys (nanoGPT's count, not the causal half); the tied head 2·n_embd·V."""
        attention = 4 * self.config.n_layer * context * self.embedding_dim
        return linear_flops(self.blocks) + attention + 2 * self.embedding_dim * self.vocab_size


class TransformerArchitecture:
    """The `transformer` architecture factory: validated settings in, `build(vocab_size)` a fresh model."""

    default_recipe = "lm"

    def __init__(self, settings: TransformerSettings | None = None) -> None:
        self.settings = settings if settings is not None else TransformerSettings()

    @property
    def embedding_dim(self) -> int:
        return self.settings.n_embd

    def build(self, vocab_size: int) -> TransformerModel:
        return TransformerModel(self.settings, vocab_size)


@hookimpl
def register_architectures(register: Any) -> None:
    register("transformer", TransformerArchitecture, settings=TransformerSettings,
             description="GPT-2-style decoder baseline (learned positions, pre-LN, tied head; lm recipe)")
