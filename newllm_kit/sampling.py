"""`newllm-kit sample`: text from a kept model, through its recipe's decoder.

The prompt is fed once, then each sampled token; the next token is drawn from softmax(logits / T)
over the `top_k` most likely tokens (all with `top_k` None), from a generator seeded with `seed`,
so a seed gives the same text on every run; temperature 0 takes the most likely token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .kept_models import KeptModel

MAX_TOKENS = 100_000


@dataclass(frozen=True)
class SampleSettings:
    tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        if not 1 <= self.tokens <= MAX_TOKENS:
            raise UserError(f"--tokens {self.tokens}: give 1 … {MAX_TOKENS:,} tokens to generate")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: give a finite number ≥ 0 (0: the most likely token)")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise UserError(f"--top-k {self.top_k}: give 1 … {vocab_size:,} (the model's vocabulary)")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed}: give an integer 0 … 2^63 − 1")


def pick(logits: torch.Tensor, settings: SampleSettings, generator: torch.Generator) -> int:
    """One token id from [V] logits: greedy at temperature 0, else a seeded draw within the top k."""
    logits = logits.detach().to("cpu", torch.float64)
    if settings.temperature == 0:
        return int(logits.argmax())
    if settings.top_k is not None and settings.top_k < logits.numel():
        cut = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < cut, -math.inf)
    probabilities = torch.softmax(logits / settings.temperature, dim=0)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def sample(kept: KeptModel, prompt: str, settings: SampleSettings) -> dict[str, Any]:
    """The prompt's continuation by `kept`'s model: ids, text, and what produced them."""
    settings.check(kept.tokenizer.vocab_size)
    prompt_ids = kept.tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt: the prompt encodes to no tokens; give some text")
    decoder = kept.require("decoder", "sample")(kept.model, kept.kept)
    device = next(kept.model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    logits = decoder.feed(torch.tensor(prompt_ids, device=device))[-1]
    ids: list[int] = []
    for position in range(settings.tokens):
        if not bool(torch.isfinite(logits).all()):
            raise UserError(f"{kept.unit}: the model gave non-finite logits after {position} sampled token(s); "
                            f"its weights are damaged: run the unit again")
        ids.append(pick(logits, settings, generator))
        if position + 1 < settings.tokens:
            logits = decoder.feed(torch.tensor(ids[-1:], device=device))[-1]
    return {"unit": kept.unit, "weights": kept.description.get("which"), "prompt": prompt,
            "prompt_ids": prompt_ids, "ids": ids, "text": kept.tokenizer.decode(ids),
            "tokens": settings.tokens, "temperature": settings.temperature, "top_k": settings.top_k,
            "seed": settings.seed}
