"""Tokenizers (`gpt2`, `bpe`, `bytes`) and the `gpt2` embedding, on locally built GPT-2-style files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import FIXTURE_GPT2_VOCAB, make_gpt2_model_dir, make_gpt2_tokenizer_dir, ultrachat_rows
from hypothesis import given
from hypothesis import strategies as st
from newllm_kit_plugins.data.local_corpora import Embedded
from newllm_kit_plugins.tokens import simple as simple_tokenizers
from newllm_kit_plugins.tokens.gpt2 import (
    GPT2Embedding,
    GPT2EmbeddingSettings,
    GPT2TokenizerFactory,
    GPT2TokenizerSettings,
)
from newllm_kit_plugins.tokens.simple import BPEFactory, BPESettings, BytesFactory, BytesTokenizer
from safetensors.torch import save_file

from newllm_kit.errors import DataError
from newllm_kit.protocols import Tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2-tokenizer"))


def gpt2(path: Path, expect: int | None = FIXTURE_GPT2_VOCAB) -> GPT2TokenizerFactory:
    return GPT2TokenizerFactory(GPT2TokenizerSettings(name_or_path=str(path), expect_vocab=expect))


# --- bytes -------------------------------------------------------------------------------------------------


@given(st.text())
def test_bytes_round_trip(text: str) -> None:
    tokenizer = BytesFactory().load([], Path("."))
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids) and tokenizer.decode(ids) == text


def test_bytes_tokenizer_is_a_tokenizer() -> None:
    tokenizer = BytesTokenizer()
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == BytesFactory.expected_vocab_size == 256
    assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"  # a cut character decodes, replaced


# --- bpe -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_texts() -> list[str]:
    source = Embedded()
    return [doc[0] for doc in source.documents(range(150))]


def test_bpe_learns_only_from_the_training_texts(training_texts: list[str], tmp_path: Path) -> None:
    settings = BPESettings(vocab_size=600)
    unseen = "quixotically zephyrs " * 40
    trained = BPEFactory(settings).load(training_texts, tmp_path)
    leaked = BPEFactory(settings).load([*training_texts, unseen], tmp_path)
    assert len(trained.encode("quixotically")) > 4
    assert len(leaked.encode("quixotically")) <= 2
    assert trained.fingerprint != leaked.fingerprint
    assert trained.vocab_size == 600 and trained.decode(trained.encode(unseen)) == unseen


def test_bpe_is_cached_and_reloaded(training_texts: list[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    factory = BPEFactory(BPESettings(vocab_size=400))
    first = factory.load(training_texts, tmp_path)
    [cached] = tmp_path.glob("bpe-*.json")

    def no_training(*args: object) -> str:
        raise AssertionError("the cached tokenizer was retrained")

    monkeypatch.setattr(simple_tokenizers, "train_bpe", no_training)
    again = factory.load(training_texts, tmp_path)
    assert again.fingerprint == first.fingerprint
    assert again.encode("def main(): pass") == first.encode("def main(): pass")
    monkeypatch.undo()
    elsewhere = factory.load(training_texts, tmp_path / "other")  # retrained: deterministic
    assert elsewhere.fingerprint == first.fingerprint
    assert json.loads(cached.read_text())["added_tokens"] == []  # no special tokens


def test_bpe_needs_training_text(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no training text"):
        BPEFactory().load(["", ""], tmp_path)


# --- gpt2 tokenizer -------------------------------------------------------------------------------------


def test_gpt2_tokenizer_from_a_local_directory(gpt2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = gpt2(gpt2_dir).load([], tmp_path)
    reference = AutoTokenizer.from_pretrained(str(gpt2_dir))
    text = ultrachat_rows(4)[3]["prompt"]
    assert tokenizer.encode(text) == reference.encode(text)  # no BOS/EOS, same ids as transformers
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == FIXTURE_GPT2_VOCAB
    assert tokenizer.fingerprint == gpt2(gpt2_dir).load([], tmp_path).fingerprint
    assert GPT2TokenizerFactory().expected_vocab_size == 50257


def test_gpt2_tokenizer_checks_the_vocabulary_size(gpt2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"has {FIXTURE_GPT2_VOCAB} tokens, expected 50257"):
        gpt2(gpt2_dir, expect=50257).load([], tmp_path)
    assert gpt2(gpt2_dir, expect=None).load([], tmp_path).vocab_size == FIXTURE_GPT2_VOCAB


def test_an_empty_vocabulary_is_detected(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{}")
    (broken / "merges.txt").write_text("#version: 0.2\n")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(DataError, match="empty vocabulary"):
        gpt2(broken, expect=None).load([], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no usable tokenizer"):
        gpt2(empty, expect=None).load([], tmp_path)


def test_a_missing_tokenizer_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tokenizer\.name_or_path: directory .* does not exist"):
        gpt2(tmp_path / "no-such-dir").load([], tmp_path)


# --- gpt2 embedding -------------------------------------------------------------------------------------


def test_gpt2_embedding_reads_wte_from_a_saved_model(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model_dir = make_gpt2_model_dir(tmp_path / "model", 50, 8)
    source = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(model_dir)))
    table = source.load(50, 8, torch.Generator())
    wte = GPT2LMHeadModel.from_pretrained(str(model_dir)).transformer.wte.weight.detach()
    assert torch.equal(table, wte) and table.dtype == torch.float32
    again = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(model_dir)))
    assert source.fingerprint() == again.fingerprint()
    with pytest.raises(DataError, match=r"has a 50×8 wte table but the model needs 50257×768"):
        source.load(50257, 768, torch.Generator())


def test_gpt2_embedding_reads_the_hub_checkpoint_layout(tmp_path: Path) -> None:
    """The hub's gpt2 model.safetensors stores the table as `wte.weight`, without a prefix."""
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_file({"wte.weight": weight, "wpe.weight": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    table = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(tmp_path))).load(4, 3, torch.Generator())
    assert torch.equal(table, weight)
    save_file({"h.0.attn.bias": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="has no token-embedding table"):
        GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(tmp_path))).load(4, 3, torch.Generator())


def test_gpt2_embedding_needs_model_safetensors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no model\.safetensors"):
        GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(tmp_path))).load(4, 3, torch.Generator())
