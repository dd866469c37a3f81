"""A kept CVFP model reading a stream token by token: what `newllm-kit sample` and the export run.

Position i's context is the sequential rollout c_i = F(c_{i−1}, x_i) (c_{−1} = 0), the fixed point
the frozen solves approximate to `solver.solve_tolerance`; its next-token logits are the head of
TokenBlock(F's per-layer outputs at i, x_i): exactly the computation Phase 2 trained. Token inputs
read the embedding values the contexts were solved with (`phase2.input_weights`), the head the
trained table, as in Phase 2.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .frozen_solve import full_precision_matmuls
from .phase2 import weights_as

INPUT_PREFIX = "input/"  # kept tensors: the embedding values the token inputs read


class CVFPDecoder:
    """`newllm_kit.protocols.Decoder` of a CVFP model: carries the last context and the last N−1 ids."""

    def __init__(self, model: Any, kept_tensors: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.inputs = {k.removeprefix(INPUT_PREFIX): v for k, v in kept_tensors.items() if k.startswith(INPUT_PREFIX)}
        device = model.embedding.weight.device
        self.context = torch.zeros(1, model.context_dim, device=device)
        self.history = int(getattr(model, "num_input_tokens", 1)) - 1
        self.tail = torch.zeros(0, dtype=torch.long, device=device)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        model, block = self.model, self.model.context_block
        ids = ids.to(self.tail.device, torch.long)
        window = torch.cat([self.tail, ids])
        with full_precision_matmuls():
            with weights_as(cast(nn.Module, model), self.inputs):
                tokens = model.token_inputs(window)[self.tail.numel():]
            projected = block.project_tokens(tokens)
            weight, bias = model.output_head()
            logits = []
            for i in range(ids.numel()):
                layers = block.step(self.context, projected[i:i + 1])
                self.context = layers[-1]
                logits.append(F.linear(model.token_states(layers, tokens[i:i + 1]), weight, bias))
        self.tail = window[window.numel() - self.history:] if self.history else self.tail
        return torch.cat(logits).float() if logits else torch.zeros(0, model.vocab_size)
