"""What a result depends on is written down: the BPE tokenizer's rows and the embedding table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures import make_gpt2_model_dir
from newllm_kit_plugins.tokens import gpt2_embedding, gpt2_tokenizer
from newllm_kit_plugins.tokens.gpt2 import (
    GPT2Embedding,
    GPT2EmbeddingSettings,
    GPT2TokenizerFactory,
    GPT2TokenizerSettings,
)
from test_experiment import TINY, read_results, write_tiny

from newllm_kit.config import load_config
from newllm_kit.errors import DataError, UserError
from newllm_kit.experiment import CorpusCache
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute
from newllm_kit.scaling import check_comparable, load_points

ONE_MODEL = ['models=[{label = "A", variant = "gradual-reduction", layers = 1, context_dim = 8, embedding_dim = 8}]',
             "phase2.epochs=1", "solver.val_convergence_trials=2"]
BPE = ['tokenizer={name = "bpe", vocab_size = 300, train_rows = {start = 0, count = 100}}']


def corpus(tmp_path: Path, overrides: list[str]) -> CorpusCache:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(write_tiny(tmp_path, TINY), load_plugins().registry, overrides)
    return CorpusCache(config, tmp_path / "cache")


def test_adding_a_training_size_leaves_the_other_units_tokens_unchanged(tmp_path: Path) -> None:
    alone = corpus(tmp_path / "a", [*BPE, "experiment.samples=[12]"])
    more = corpus(tmp_path / "b", [*BPE, "experiment.samples=[12, 200]"])
    assert alone.tokenizer.fingerprint == more.tokenizer.fingerprint
    assert torch.equal(alone.train_ids(12), more.train_ids(12))
    assert torch.equal(alone.val.ids, more.val.ids)


def test_the_tokenizer_rows_are_in_the_split_fingerprint(tmp_path: Path) -> None:
    other = ['tokenizer={name = "bpe", vocab_size = 300, train_rows = {start = 100, count = 100}}']
    first = corpus(tmp_path / "a", [*BPE, "experiment.samples=[12]"]).fingerprints
    second = corpus(tmp_path / "b", [*other, "experiment.samples=[12]"]).fingerprints
    assert first["split"] != second["split"] and first["corpus"] == second["corpus"]


def test_tokenizer_rows_may_not_overlap_validation_or_leave_the_corpus(tmp_path: Path) -> None:
    overlap = ['tokenizer={name = "bpe", train_rows = {start = 250, count = 100}}']
    with pytest.raises(DataError, match=r"tokenizer\.train_rows 250…349 overlap validation rows 300…311"):
        corpus(tmp_path / "a", overlap)
    with pytest.raises(DataError, match=r"tokenizer\.train_rows 0…999 overlap validation rows 300…311"):
        corpus(tmp_path / "b", ['tokenizer.name="bpe"'])  # the default, on a corpus of 400 rows
    past = ['tokenizer={name = "bpe", train_rows = {start = 350, count = 100}}']
    with pytest.raises(DataError, match=r"tokenizer\.train_rows 350…449 reach past the corpus's 400 rows"):
        corpus(tmp_path / "c", past)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("provenance")
    path = write_tiny(tmp, TINY)
    overrides = [*ONE_MODEL, "experiment.samples=[12]"]
    first = execute(path, overrides, tmp / "runs", False, "none", load_plugins())
    other = execute(path, [*ONE_MODEL, "experiment.samples=[24]", "embedding.std=0.05"], tmp / "other", False,
                    "none", load_plugins())
    return {"path": path, "tmp": tmp, "overrides": overrides, "first": Path(first["run_dir"]),
            "other": Path(other["run_dir"])}


def test_meta_and_every_record_name_the_embedding(runs: dict[str, Any]) -> None:
    meta = json.loads((runs["first"] / "meta.json").read_text())
    record = read_results(runs["first"])[0]
    assert meta["embedding"]["source"] == "random" and len(meta["embedding"]["sha256"]) == 64
    assert record["embedding"] == meta["embedding"]
    assert record["fingerprints"]["embedding"] == meta["embedding"]["sha256"]


def test_resume_refuses_another_embedding_table(runs: dict[str, Any]) -> None:
    meta_path = runs["first"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "embedding": {**meta["embedding"], "sha256": "0" * 64}}))
    try:
        for source in (runs["first"], runs["path"]):  # the run directory, or the file with --resume
            with pytest.raises(UserError, match=r"cannot resume: embedding\.sha256 differs"):
                execute(source, runs["overrides"], runs["tmp"] / "runs", True, "none", load_plugins())
    finally:
        meta_path.write_text(json.dumps(meta))


def test_scaling_refuses_runs_with_different_embeddings(runs: dict[str, Any]) -> None:
    points, _ = load_points([runs["first"], runs["other"]])
    with pytest.raises(UserError, match="different data fingerprints"):
        check_comparable(points, allow_mixed=False)


def test_gpt2_revision_reaches_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    import transformers

    model_dir = make_gpt2_model_dir(tmp_path / "model", 50, 8)
    asked: list[dict[str, Any]] = []

    def download(repo: str, filename: str, **kwargs: Any) -> str:
        asked.append({"repo": repo, **kwargs})
        return str(model_dir / filename)

    for module in (gpt2_embedding, gpt2_tokenizer):
        monkeypatch.setattr(module, "hub_reachable", lambda timeout=0.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    embedding = GPT2Embedding(GPT2EmbeddingSettings(name_or_path="gpt2", revision="607a30d"))
    assert embedding.load(50, 8, torch.Generator()).shape == (50, 8)
    assert asked[0]["revision"] == "607a30d"

    def from_pretrained(name: str, **kwargs: Any) -> Any:
        asked.append({"repo": name, **kwargs})
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(DataError):
        GPT2TokenizerFactory(GPT2TokenizerSettings(revision="607a30d")).load([], tmp_path)
    assert asked[1]["revision"] == "607a30d"


def test_a_revision_with_a_local_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"embedding\.revision = 'main' applies to a hub repo id"):
        GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(tmp_path), revision="main")).load(4, 3,
                                                                                              torch.Generator())
