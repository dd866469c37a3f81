"""The lm recipe's contract: what an autoregressive model provides (`newllm_kit_plugins.lm.AutoregressiveModel`).

A third-party architecture trained by `recipe = "lm"` implements this; structural, like
`newllm_kit.protocols`, so nothing needs to inherit from it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from newllm_kit.protocols import LanguageModel


class AutoregressiveModel(LanguageModel, Protocol):
    """What the lm recipe needs of a model, beyond `newllm_kit.protocols.LanguageModel`; it trains the
    model's `param_groups()["train"]` and reads logits from `output_head()`."""

    block_size: int | None  # longest input an attention model reads; None: a recurrent model that carries state

    def hidden(self, ids: torch.Tensor, state: Any | None = None) -> tuple[torch.Tensor, Any]:
        """[b, t] token ids -> ([b, t, E] final hidden states, before the head; the new state).
        Position j may read only ids[:, :j+1] (and `state`). Attention models ignore `state` and
        return None; recurrent ones continue from `state` (None: empty) and return theirs."""
        ...
