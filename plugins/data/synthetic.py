"""Data source `synthetic`: text from a seeded sparse Markov chain whose entropy rate is known exactly.

Real corpora never say how good a model could be; this one does. Words `w0 … w{vocab-1}` follow a
chain of order k: each state (the last k words) has `branching` possible next words with
Dirichlet-random probabilities. Every state may be followed by `w0` (a common word, like "the"),
so from anywhere the chain can reach the state `w0 … w0`, which follows itself: there is exactly
one recurrent class and it is aperiodic, hence one stationary distribution π and a well-defined
entropy rate h = Σ_s π(s)·H(next word | s).

Bounds: `best_ppl_per_word()` = exp(h) is the lowest word-level perplexity any model can reach.
Token-level PPL is per token, and with `bytes` or `bpe` a word is several tokens (a word and its
space are ~3–4 bytes), so the bound becomes exp(h · words / tokens): `best_token_ppl_for`.
`best_token_ppl` (read by the experiment runner) uses the exact entropy of whole documents, which
start afresh from π, and assumes the documents were not truncated (so not the *_128/*_512 schemes).
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from newllm_kit import hookimpl
from newllm_kit.corpus import Stream, texts_sha256

from .local_corpora import DocumentList

MAX_STATES_TIMES_VOCAB = 1 << 24  # with vocab ≥ 2 this allows order ≤ 23 and vocab ≤ 4096
DOCS_PER_BLOCK = 256  # documents are drawn in fixed blocks, so row i does not depend on `docs`


class SyntheticSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: int = Field(default=1, ge=1, le=23, description="k: the next word depends on the previous k words.")
    vocab: int = Field(default=64, ge=2, le=1 << 12, description="Number of word types (rendered w0, w1, …).")
    branching: int = Field(
        default=4, ge=1, le=1 << 12, description="Possible successors of each state (one of them is w0).")
    docs: int = Field(default=2000, ge=1, le=10**7, description="Number of documents (rows).")
    words_per_doc: int = Field(default=100, ge=1, le=10**6, description="Words per document.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the chain and of the documents.")

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticSettings:
        if self.branching > self.vocab:
            raise ValueError(f"branching ({self.branching}) cannot exceed vocab ({self.vocab})")
        if self.words_per_doc < self.order:
            raise ValueError(f"words_per_doc ({self.words_per_doc}) must be ≥ order ({self.order})")
        if self.vocab ** (self.order + 1) > MAX_STATES_TIMES_VOCAB:
            raise ValueError(f"vocab^(order+1) = {self.vocab ** (self.order + 1)} is too large "
                             f"(limit {MAX_STATES_TIMES_VOCAB}); lower vocab or order")
        return self


def _entropies(probs: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy in nats (0·log 0 = 0)."""
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return np.asarray(-(probs * logs).sum(axis=-1))


class MarkovChain:
    """States are k-word tuples encoded base `vocab`, oldest word most significant."""

    def __init__(self, settings: SyntheticSettings, rng: np.random.Generator) -> None:
        v, k, b = settings.vocab, settings.order, settings.branching
        self.vocab, self.order, self.states = v, k, v**k
        keys = rng.random((self.states, v - 1), dtype=np.float32)
        others = np.argsort(keys, axis=1)[:, : b - 1] + 1  # b−1 distinct words besides w0
        self.successors = np.concatenate([np.zeros((self.states, 1), dtype=np.int64), others], axis=1)
        self.probs = rng.dirichlet(np.ones(b), size=self.states)
        self.next_state = (np.arange(self.states)[:, None] * v + self.successors) % self.states
        self.stationary = self._stationary()

    def _stationary(self, tolerance: float = 1e-13, max_steps: int = 200_000) -> np.ndarray:
        pi = np.full(self.states, 1.0 / self.states)
        targets = self.next_state.ravel()
        for _ in range(max_steps):
            mass = np.bincount(targets, weights=(pi[:, None] * self.probs).ravel(), minlength=self.states)
            new = mass.astype(np.float64) / mass.sum()
            if np.abs(new - pi).sum() < tolerance:
                return np.asarray(new)
            pi = new
        raise RuntimeError("synthetic: the stationary distribution did not converge")

    def entropy_rate(self) -> float:
        return float(self.stationary @ _entropies(self.probs))

    def start_entropy(self) -> float:
        """Entropy of the first k words of a document, drawn from π."""
        return float(_entropies(self.stationary))

    def sample(self, rng: np.random.Generator, count: int, length: int) -> np.ndarray:
        """[count, length] words: first state from π, then `length − k` transitions."""
        start = rng.choice(self.states, size=count, p=self.stationary)
        words = np.empty((count, length), dtype=np.int64)
        for i in range(min(self.order, length)):
            words[:, i] = (start // self.vocab ** (self.order - 1 - i)) % self.vocab
        cumulative = np.cumsum(self.probs, axis=1)
        cumulative[:, -1] = 1.0
        state = start
        for t in range(self.order, length):
            u = rng.random(count)
            choice = (u[:, None] >= cumulative[state]).sum(axis=1)
            words[:, t] = self.successors[state, choice]
            state = self.next_state[state, choice]
        return words


class Synthetic(DocumentList):
    """The `synthetic` source: `docs` single-turn documents of `words_per_doc` words."""

    name = "synthetic"

    def __init__(self, settings: SyntheticSettings | None = None) -> None:
        super().__init__()
        self.settings = settings if settings is not None else SyntheticSettings()
        self._chain_seed, self._docs_seed = np.random.SeedSequence(self.settings.seed).spawn(2)

    @cached_property
    def chain(self) -> MarkovChain:
        """Built on first use: `newllm-kit validate` constructs the source and should stay instant."""
        return MarkovChain(self.settings, np.random.default_rng(self._chain_seed))

    def _read(self) -> list[list[str]]:
        """Rendered a block at a time: only the text of a large corpus is held, not its words too."""
        s = self.settings
        names = [f"w{w}" for w in range(s.vocab)]
        docs: list[list[str]] = []
        for seed in self._docs_seed.spawn(-(-s.docs // DOCS_PER_BLOCK)):
            words = self.chain.sample(np.random.default_rng(seed), DOCS_PER_BLOCK, s.words_per_doc)
            docs += [[" ".join(names[w] for w in row)] for row in words.tolist()]
        return docs[: s.docs]

    def entropy_rate_nats(self) -> float:
        """h: nats per word in the long run (exact, from the chain)."""
        return self.chain.entropy_rate()

    def best_ppl_per_word(self) -> float:
        """exp(h): no model can reach a lower word-level perplexity."""
        return math.exp(self.entropy_rate_nats())

    def document_entropy_nats(self) -> float:
        """Exact entropy of one document: H(π) for its first k words, h for each later word."""
        s = self.settings
        return self.chain.start_entropy() + (s.words_per_doc - s.order) * self.entropy_rate_nats()

    def best_token_ppl_for(self, words: int, tokens: int) -> float:
        """Token-level bound from the entropy rate: exp(h · words / tokens)."""
        return math.exp(self.entropy_rate_nats() * words / tokens)

    def best_token_ppl(self, tokens: int, stream: Stream) -> float:
        """Lowest achievable PPL over a stream of whole (untruncated) documents of this source."""
        return math.exp(len(stream.boundaries) * self.document_entropy_nats() / tokens)

    def fingerprint(self) -> str:
        payload = {"source": "synthetic-markov-v1", "settings": self.settings.model_dump(),
                   "texts": texts_sha256([doc[0] for doc in self.all_documents()])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"entropy_rate_nats": self.entropy_rate_nats(), "best_ppl_per_word": self.best_ppl_per_word(),
                **self.settings.model_dump()}


@hookimpl
def register_data_sources(register: Any) -> None:
    register("synthetic", Synthetic, settings=SyntheticSettings,
             description="seeded sparse Markov chain of order k with an exactly known entropy rate")
