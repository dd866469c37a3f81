"""A kept autoregressive model reading a stream token by token: what `newllm-kit sample` and the export run.

A recurrent model (`block_size` None) carries its state from one `feed` to the next. An attention
model reads each position with the last `block_size` tokens up to it (the whole stream while it is
shorter), as nanoGPT's sampler crops its context; the positions of one `feed` go through the model
together where they share a window.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

WINDOWS_PER_PASS = 16  # windows of block_size tokens batched into one forward, past the first block


class LMDecoder:
    """`newllm_kit.protocols.Decoder` of a model with the lm recipe's contract (`AutoregressiveModel`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.state: Any = None
        self.seen = torch.zeros(0, dtype=torch.long, device=self.device)

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        weight, bias = self.model.output_head()
        return F.linear(states, weight, bias).float()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device, torch.long)
        block = self.model.block_size
        if block is None:
            states, self.state = self.model.hidden(ids[None], self.state)
            return self._logits(states[0])
        self.seen = torch.cat([self.seen, ids])
        n, first = self.seen.numel(), self.seen.numel() - ids.numel()
        rows = []
        if first < block:  # positions inside the first block read the stream from its start
            states = self.model.hidden(self.seen[None, :min(n, block)])[0][0]
            rows.append(states[first:])
        later = range(max(first, block), n)
        for start in range(0, len(later), WINDOWS_PER_PASS):
            ends = torch.tensor(later[start:start + WINDOWS_PER_PASS], device=self.device)
            windows = self.seen[ends[:, None] + torch.arange(1 - block, 1, device=self.device)]
            rows.append(self.model.hidden(windows)[0][:, -1])
        return self._logits(torch.cat(rows))
