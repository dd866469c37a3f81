"""The `gpt2` plugin: the reference's tokenizer (`gpt2_tokenizer`) and its pretrained table (`gpt2_embedding`)."""

from __future__ import annotations

from typing import Any

from newllm_kit import hookimpl

from .gpt2_embedding import GPT2Embedding, GPT2EmbeddingSettings
from .gpt2_tokenizer import GPT2TokenizerFactory, GPT2TokenizerSettings


@hookimpl
def register_tokenizers(register: Any) -> None:
    register("gpt2", GPT2TokenizerFactory, settings=GPT2TokenizerSettings,
             description="GPT-2 BPE (50257 tokens) from the hub or a local directory")


@hookimpl
def register_embeddings(register: Any) -> None:
    register("gpt2", GPT2Embedding, settings=GPT2EmbeddingSettings,
             description="pretrained GPT-2 wte table from model.safetensors (hub or local directory)")
