"""The architecture `cvfp`: the CVFP (Context Vector Fixed-Point) language model's settings, blocks,
model and FLOP counts.

A ContextBlock F(c, x) maps the previous token's context and the current token input to L
per-layer contexts; Phase 1 trains it towards a fixed point over a stream. A TokenBlock reads
those per-layer contexts, one TokenLayer per ContextLayer (the seed's "E案" wiring), and turns
the token input into a state that the output head scores against the vocabulary.

Both variants of the reference system are options of one implementation:

* ``token-every-layer`` (spec Variant A / A-N, 2025-11-27 and 11/28 v1): every ContextLayer reads
  the token input and keeps width C.
* ``gradual-reduction`` (spec Variant B, 11/28 v2, "等差減少", gradual dimension reduction): only
  ContextLayer 1 reads the token input; context widths shrink evenly from C+T to C, token widths
  from T to E. A shape of the model, fixed when it is built; the Phase-1 solver `gradual-decrease`
  (also 等差) is something else, a training schedule whose step size and noise fall pass by pass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from newllm_kit import hookimpl
from newllm_kit.params import load_table, require_memory, weight_bytes
from newllm_kit.presets import PresetSettings

PRESETS: dict[str, dict[str, Any]] = {"6L-768": {"layers": 6, "context_dim": 768},
                                     "3L-1536": {"layers": 3, "context_dim": 1536}}
# Upper bounds keep every weight's element count far inside int64 (torch's size type); whether a
# model within them fits in memory is checked when it is built.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 20
MAX_INPUT_TOKENS = 64


class CVFPSettings(PresetSettings):
    """The `[[models]]` keys of `architecture = "cvfp"`; widths follow spec §2."""

    model_config = ConfigDict(extra="forbid")
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: Literal["6L-768", "3L-1536"] | None = Field(
        default=None, description="Shorthand for layers/context_dim (6/768 or 3/1536); explicit keys win.")
    variant: Literal["token-every-layer", "gradual-reduction"] = Field(
        default="gradual-reduction",
        description="token-every-layer: token input into every ContextLayer, constant width C (11/27, v1); "
                    "gradual-reduction: token into layer 1 only, widths shrink from C+T to C (v2).")
    layers: int = Field(default=6, ge=1, le=MAX_LAYERS,
                        description="L: number of ContextLayers (and of TokenLayers).")
    context_dim: int = Field(default=768, ge=1, le=MAX_WIDTH,
                             description="C: context width handed from token to token.")
    embedding_dim: int = Field(default=768, ge=1, le=MAX_WIDTH,
                               description="E: token-embedding width (768 for GPT-2 wte).")
    num_input_tokens: int = Field(
        default=1, ge=1, le=MAX_INPUT_TOKENS,
        description="N: token input = last N normalised embeddings, oldest first (T = N·E).")
    num_context_splits: int = Field(
        default=1, ge=1, le=MAX_WIDTH,
        description="S: independent ContextBlocks of width C/S, each reading all of T.")
    split_training: Literal["separate", "joint"] = Field(
        default="separate",
        description="Phase 1 with S > 1: separate: each split on its own samples (index ≡ s mod S) with its own "
                    "Adam, as the reference (spec §2.6); joint: the merged block on the whole stream.")
    tie_head: bool = Field(
        default=True, description="True: logits use the embedding table; False: own Lin(E→V), zero init.")

    @field_validator("num_context_splits")
    @classmethod
    def _splits_divide_context(cls, splits: int, info: ValidationInfo) -> int:
        context_dim = info.data.get("context_dim")
        if context_dim is not None and context_dim % splits:
            raise ValueError(f"context_dim {context_dim} is not divisible by num_context_splits {splits}")
        return splits

    @property
    def token_width(self) -> int:
        """T = N·E."""
        return self.num_input_tokens * self.embedding_dim

    @property
    def split_dim(self) -> int:
        """C' = C/S: the context width each independent ContextBlock owns."""
        return self.context_dim // self.num_context_splits

    @property
    def split_layer_widths(self) -> tuple[int, ...]:
        """d'_1..d'_L of one split; gradual reduction uses d'_i = C' + T − ⌊T·i/L⌋."""
        c, t, n = self.split_dim, self.token_width, self.layers
        if self.variant == "token-every-layer":
            return (c,) * n
        return tuple(c + t - (t * i) // n for i in range(1, n + 1))

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """Merged d_1..d_L: every split's layer outputs concatenated."""
        return tuple(self.num_context_splits * d for d in self.split_layer_widths)

    @property
    def token_layer_widths(self) -> tuple[int, ...]:
        """t_0..t_L of the token state (t_0 = T, t_L = E); gradual reduction uses t_j = T − ⌊(T−E)·j/L⌋."""
        t, e, n = self.token_width, self.embedding_dim, self.layers
        if self.variant == "token-every-layer":
            return (t,) + (e,) * n
        return tuple(t - ((t - e) * j) // n for j in range(n + 1))


class ResidualLayer(nn.Module):
    """The layer template of every CVFP layer: ``LN(ρ + ReLU(Lin(inputs)))``.

    ``inputs`` is the concatenation the layer reads (e.g. ``[h; x]``) and ``residual`` the vector
    it carries forward; ρ = residual when its width matches the output, else a learned
    projection. One Linear, no hidden expansion, no dropout. Callers that precompute part of
    ``Lin(inputs)`` (the ContextBlock's token half) call `finish` with the pre-activation.
    """

    def __init__(self, in_width: int, out_width: int, residual_width: int) -> None:
        super().__init__()
        self.residual_width = residual_width
        self.linear = nn.Linear(in_width, out_width)
        self.proj = nn.Linear(residual_width, out_width) if residual_width != out_width else None
        self.norm = nn.LayerNorm(out_width)

    def forward(self, inputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.finish(self.linear(inputs), residual)

    def finish(self, pre_activation: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        rho = residual if self.proj is None else self.proj(residual)
        return self.norm(rho + F.relu(pre_activation))


class ContextBlock(nn.Module):
    """F(c, x) -> [h_1 … h_L]: S independent splits (stacks of ContextLayers), outputs concatenated per layer.

    Layer j of a split reads ``[h_{j−1}; x]`` when it takes the token input (every layer for
    token-every-layer, layer 1 only for gradual reduction), else ``h_{j−1}``; h_0 is the split's
    slice of the incoming context. Since ``Lin([h; x]) = W_h·h + (W_x·x + b)``, `project_tokens`
    computes the bracketed half once per stream and `step` adds only the context half.
    """

    def __init__(self, cfg: CVFPSettings, shared: list[nn.ModuleList] | None = None) -> None:
        super().__init__()
        self.split_dim = cfg.split_dim
        every_layer = cfg.variant == "token-every-layer"
        self.takes_tokens = tuple(every_layer or j == 0 for j in range(cfg.layers))
        self.splits = nn.ModuleList(shared if shared is not None else
                                    (self._split(cfg) for _ in range(cfg.num_context_splits)))

    def _split(self, cfg: CVFPSettings) -> nn.ModuleList:
        layers, carried = [], cfg.split_dim
        for out, takes in zip(cfg.split_layer_widths, self.takes_tokens, strict=True):
            layers.append(ResidualLayer(carried + (cfg.token_width if takes else 0), out, carried))
            carried = out
        return nn.ModuleList(layers)

    def _split_layers(self) -> list[list[ResidualLayer]]:
        # ModuleList erases its element type; narrow it once for the type checker.
        return [[m for m in split.children() if isinstance(m, ResidualLayer)] for split in self.splits]

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, T] -> [n, P]: ``W_x·x + b`` of every token-reading layer, split by split, layer by layer."""
        # A ContextLayer's Linear reads [h; x]: its first residual_width columns act on the context.
        parts = [F.linear(tokens, layer.linear.weight[:, layer.residual_width:], layer.linear.bias)
                 for split in self._split_layers()
                 for layer, takes in zip(split, self.takes_tokens, strict=True) if takes]
        return torch.cat(parts, dim=-1)

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        """[b, C] contexts and [b, P] projected tokens -> L layer outputs [b, d_j]; the last is width C."""
        per_split, offset = [], 0
        for layers, h in zip(self._split_layers(), context.split(self.split_dim, dim=-1), strict=True):
            outputs = []
            for layer, takes in zip(layers, self.takes_tokens, strict=True):
                if takes:
                    width = layer.linear.out_features
                    token_half = projected[..., offset:offset + width]
                    pre = F.linear(h, layer.linear.weight[:, :layer.residual_width]) + token_half
                    offset += width
                else:
                    pre = layer.linear(h)
                h = layer.finish(pre, h)
                outputs.append(h)
            per_split.append(outputs)
        if len(per_split) == 1:
            return per_split[0]
        return [torch.cat(layer_outputs, dim=-1) for layer_outputs in zip(*per_split, strict=True)]

    def forward(self, context: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        return self.step(context, self.project_tokens(tokens))


class TokenBlock(nn.Module):
    """[h_1 … h_L], x -> u_L: TokenLayer j reads ``[h_j; u_{j−1}]`` and carries u (u_0 = x).

    Token widths narrow from T to E. In token-every-layer, TokenLayer 1 narrows by keeping only
    the current token's embedding (the last E features of x) as its residual; in gradual
    reduction, layers whose widths differ use a learned projection instead.
    """

    def __init__(self, cfg: CVFPSettings) -> None:
        super().__init__()
        t = cfg.token_layer_widths
        first_residual = cfg.embedding_dim if cfg.variant == "token-every-layer" else t[0]
        self.residual_widths = (first_residual, *t[1:-1])
        self.layers = nn.ModuleList(ResidualLayer(d + t[j], t[j + 1], self.residual_widths[j])
                                    for j, d in enumerate(cfg.layer_widths))

    def forward(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        u = tokens
        for layer, h, kept in zip(self.layers, layer_contexts, self.residual_widths, strict=True):
            u = layer(torch.cat([h, u], dim=-1), u[..., -kept:])  # kept < width(u): Variant A's layer 1
        return u


class CVFPModel(nn.Module):
    """Embedding + embed_norm, ContextBlock, TokenBlock and the output head (`cvfp_contract.CVFPModel`).

    embed_norm is frozen: the kit computes token inputs once per stream without gradients (as
    the context-cache implementation at 49da23b did), so neither phase trains it. The per-token
    Phase 2 of the reported runs also trained its 2E = 1,536 parameters (spec §4.1).
    """

    def __init__(self, cfg: CVFPSettings, vocab_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size = vocab_size
        self.embedding_dim = cfg.embedding_dim
        self.context_dim = cfg.context_dim
        self.token_width = cfg.token_width
        self.layer_widths = cfg.layer_widths
        self.num_input_tokens = cfg.num_input_tokens
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.embed_norm = nn.LayerNorm(cfg.embedding_dim)
        self.context_block = ContextBlock(cfg)
        self.token_block = TokenBlock(cfg)
        self.head = None if cfg.tie_head else nn.Linear(cfg.embedding_dim, vocab_size)
        self._init_weights()
        self.embed_norm.requires_grad_(False)

    def _init_weights(self) -> None:
        for block in (self.context_block, self.token_block):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.1)
                    nn.init.normal_(module.bias, std=0.01)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if self.head is not None:  # the 11/27 head starts at zero: uniform logits until Phase 2 trains it
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] ids -> [n, N·E]: normalised embeddings of tokens i−N+1 … i, zeros before the stream start."""
        x = self.embed_norm(self.embedding(ids))
        n, history = x.shape[0], self.num_input_tokens - 1
        padded = torch.cat([x.new_zeros(history, x.shape[1]), x])
        return torch.cat([padded[k:k + n] for k in range(history + 1)], dim=-1)

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Per-layer contexts [b, d_j] and token inputs [b, T] -> token states [b, E]."""
        return self.token_block(layer_contexts, tokens)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.head is None:
            return self.embedding.weight, None
        return self.head.weight, self.head.bias

    def forward(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] for a batch whose per-layer contexts are already solved."""
        weight, bias = self.output_head()
        return F.linear(self.token_states(layer_contexts, tokens), weight, bias)

    def split_views(self) -> list[SplitView]:
        """One model per split for split-mode Phase 1 (spec §2.6), sharing this model's weights; none
        with one split or `split_training = "joint"`, where Phase 1 trains the merged block."""
        if self.config.num_context_splits == 1 or self.config.split_training == "joint":
            return []
        return [SplitView(self, index) for index in range(self.config.num_context_splits)]

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        """Load a [V, E] table (GPT-2 wte or a seeded random one); frozen tables get no gradient."""
        # An untied head leaves the table to the token inputs, which are computed without gradients:
        # no phase can train it, so it is frozen whatever `freeze` says (see `param_groups`).
        load_table(self.embedding.weight, weight, trainable=not freeze and self.head is None)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Phase 1 trains the ContextBlock; Phase 2 the TokenBlock and the head: an untied head, or a
        trainable (`freeze = false`) table tied to the output. Token inputs are computed without
        gradients, so an untied model's table gets none: it is left out, and so is its count."""
        phase2 = list(self.token_block.parameters())
        if self.head is not None:
            phase2 += list(self.head.parameters())
        else:
            phase2 += [p for p in self.embedding.parameters() if p.requires_grad]
        return {"phase1": list(self.context_block.parameters()), "phase2": phase2}

    def param_counts(self) -> dict[str, int]:
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        counts = {"context_block": count(self.context_block), "token_block": count(self.token_block),
                  "embedding": count(self.embedding) + count(self.embed_norm), "head": count(self.head)}
        return {**counts, "total": sum(counts.values())}


class SplitView(nn.Module):
    """Split `index` of a CVFP model seen by a solver as a whole model: a ContextBlock of width C/S
    holding that split's layers (the same parameters), reading the model's full token input."""

    def __init__(self, model: CVFPModel, index: int) -> None:
        super().__init__()
        self.model = model
        split = model.context_block.splits[index]
        assert isinstance(split, nn.ModuleList)  # narrows ModuleList's element type for the type checker
        self.context_block = ContextBlock(model.config, [split])
        self.context_dim = model.config.split_dim
        self.layer_widths = model.config.split_layer_widths
        self.token_width = model.token_width
        self.num_input_tokens = model.num_input_tokens

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_inputs(ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": list(self.context_block.parameters()), "phase2": []}


def _linear_flops(module: nn.Module) -> int:
    """2 × multiply-adds of every Linear: matmuls only, like nanoGPT (LayerNorm/ReLU/bias are O(width))."""
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def context_flops_per_token(model: CVFPModel) -> int:
    """Forward FLOPs of one ContextBlock evaluation per token: `step` plus its share of `project_tokens`."""
    return _linear_flops(model.context_block)


def token_flops_per_token(model: CVFPModel, include_head: bool) -> int:
    """Forward FLOPs of the TokenBlock per token, plus 2·E·V for the logits if `include_head`."""
    head = 2 * model.embedding_dim * model.vocab_size if include_head else 0
    return _linear_flops(model.token_block) + head


class CVFPArchitecture:
    """The `cvfp` architecture factory: validated settings in, `build(vocab_size)` gives a fresh model."""

    default_recipe = "cvfp"  # Phase 1 then Phase 2: `newllm_kit_plugins.cvfp.recipe`

    def __init__(self, settings: CVFPSettings | None = None) -> None:
        self.settings = settings if settings is not None else CVFPSettings()

    @property
    def embedding_dim(self) -> int:
        return self.settings.embedding_dim

    def build(self, vocab_size: int) -> CVFPModel:
        """A fresh model on the default device; one whose weights cannot fit there is refused first."""
        device = torch.get_default_device()
        if device.type != "meta":
            with torch.device("meta"):
                needed = weight_bytes(CVFPModel(self.settings, vocab_size))
            s = self.settings
            require_memory(needed, device, "the cvfp model's weights",
                           f"context_dim ({s.context_dim:,}), embedding_dim ({s.embedding_dim:,}) or layers "
                           f"({s.layers}) in its [[models]] entry")
        return CVFPModel(self.settings, vocab_size)


@hookimpl
def register_architectures(register: Any) -> None:
    register("cvfp", CVFPArchitecture, settings=CVFPSettings,
             description="CVFP ContextBlock + TokenBlock (token-every-layer or gradual-reduction widths)")
