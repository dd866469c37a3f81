"""Data sources and the corpus pipeline: spec §1 (schemes T1–T4, streams, disjoint rows, caching)."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import (
    FIXTURE_GPT2_VOCAB,
    make_gpt2_model_dir,
    make_gpt2_tokenizer_dir,
    make_ultrachat_jsonl,
    make_ultrachat_parquet,
    ultrachat_rows,
)
from huggingface_hub import constants as hub_constants
from newllm_kit_plugins import hub
from newllm_kit_plugins.data.local_corpora import MIN_WORDS, Embedded, TextFiles, TextSettings
from newllm_kit_plugins.data.synthetic import Synthetic, SyntheticSettings
from newllm_kit_plugins.data.ultrachat import UltraChat, UltraChatSettings
from newllm_kit_plugins.tokens.gpt2 import (
    GPT2Embedding,
    GPT2EmbeddingSettings,
    GPT2TokenizerFactory,
    GPT2TokenizerSettings,
)
from newllm_kit_plugins.tokens.random_embedding import RandomEmbedding, RandomEmbeddingSettings
from newllm_kit_plugins.tokens.simple import BytesFactory, BytesTokenizer
from pydantic import ValidationError
from scipy.special import entr

from newllm_kit import corpus
from newllm_kit.corpus import Split, build_stream, load_streams
from newllm_kit.errors import DataError, PluginError

ROWS = 60
OFFLINE_MESSAGE = ("data source 'ultrachat': cannot load HuggingFaceH4/ultrachat_200k (offline or not "
                   'cached); set data.path to a local parquet/jsonl copy, or data.source = "embedded"')


class Memory:
    """A DataSource over documents held in a list."""

    def __init__(self, docs: list[list[str]]) -> None:
        self.docs = docs

    def size(self) -> int:
        return len(self.docs)

    def documents(self, rows: Sequence[int]) -> list[list[str]]:
        return [self.docs[r] for r in rows]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.docs).encode()).hexdigest()


def first_turns(rows: Sequence[int]) -> list[list[str]]:
    all_rows = ultrachat_rows(max(rows) + 1)
    return [[m["content"] for m in all_rows[r]["messages"]] for r in rows]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2-tokenizer"))


def local_ultrachat(path: Path, tmp_path: Path) -> UltraChat:
    return UltraChat(UltraChatSettings(path=str(path), cache_dir=str(tmp_path / "datasets")))


# --- ultrachat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_ultrachat_parquet, make_ultrachat_jsonl])
def test_ultrachat_local_copy_gives_rows_in_dataset_order(make: Callable[[Path, int], Path],
                                                          tmp_path: Path) -> None:
    make(tmp_path / "data", ROWS)
    source = local_ultrachat(tmp_path / "data", tmp_path)
    assert source.size() == ROWS
    assert source.documents([7, 0, 59]) == first_turns([7, 0, 59])
    assert source.documents([]) == []
    with pytest.raises(DataError, match="row 60 requested but the corpus has 60 rows"):
        source.documents([60])


def test_parquet_and_jsonl_copies_hold_the_same_documents(tmp_path: Path) -> None:
    parquet = local_ultrachat(make_ultrachat_parquet(tmp_path / "p", 25), tmp_path)
    jsonl = local_ultrachat(make_ultrachat_jsonl(tmp_path / "j", 25), tmp_path)
    assert parquet.documents(range(25)) == jsonl.documents(range(25))


def test_ultrachat_directory_prefers_files_of_the_split(tmp_path: Path) -> None:
    make_ultrachat_parquet(tmp_path / "data", 30, name="train_sft-00000-of-00001.parquet")
    make_ultrachat_parquet(tmp_path / "data", 5, name="test_sft-00000-of-00001.parquet")
    assert local_ultrachat(tmp_path / "data", tmp_path).size() == 30


def test_ultrachat_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    a = local_ultrachat(make_ultrachat_parquet(tmp_path / "a", 20), tmp_path)
    b = local_ultrachat(make_ultrachat_parquet(tmp_path / "b", 20), tmp_path)
    c = local_ultrachat(make_ultrachat_parquet(tmp_path / "c", 21), tmp_path)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64


def test_missing_messages_column_names_file_and_column(tmp_path: Path) -> None:
    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "prompt_id": "1"}]), parquet)
    with pytest.raises(DataError, match=r"bad\.parquet: missing column 'messages' \(has: prompt, prompt_id"):
        local_ultrachat(parquet, tmp_path).size()
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hi", "conversation": []}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: missing column 'messages'"):
        local_ultrachat(jsonl, tmp_path).size()


def test_missing_local_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path .* does not exist"):
        local_ultrachat(tmp_path / "nowhere", tmp_path).size()


OFFLINE_SCRIPT = """
import json, sys, time
from newllm_kit.errors import DataError
from newllm_kit_plugins.tokens.gpt2 import GPT2Embedding, GPT2TokenizerFactory
from newllm_kit_plugins.data.ultrachat import UltraChat
import datasets, huggingface_hub  # importing them is not what the 5 s limit is about
out = {}
for name, call in [("ultrachat", lambda: UltraChat().size()),
                   ("tokenizer", lambda: GPT2TokenizerFactory().load([], None)),
                   ("embedding", lambda: GPT2Embedding().fingerprint())]:
    start = time.perf_counter()
    try:
        call()
        out[name] = ["loaded", 0.0]
    except DataError as error:
        out[name] = [str(error), time.perf_counter() - start]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_hub_sources_fail_fast_and_in_one_line_when_offline(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ultrachat"][0] == OFFLINE_MESSAGE
    assert "set tokenizer.name_or_path to a local GPT-2 tokenizer directory" in out["tokenizer"][0]
    assert 'embedding.source = "random"' in out["embedding"][0]
    for message, seconds in out.values():
        assert "\n" not in message and seconds < 5.0


def test_offline_with_nothing_cached_fails_before_importing_datasets(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The common offline case answers without `datasets` (whose import alone takes seconds); with a
    cache entry present, `datasets` is still asked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "arrow"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it now raises ImportError
    with pytest.raises(DataError) as caught:
        UltraChat().size()
    assert str(caught.value) == OFFLINE_MESSAGE
    (tmp_path / "arrow" / "HuggingFaceH4___ultrachat_200k").mkdir(parents=True)
    with pytest.raises(ImportError):
        UltraChat().size()


def test_unreachable_hub_is_detected_without_waiting_for_retries(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE unset, but the endpoint refuses connections: the probe sends us to the cache."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(DataError) as caught:
        UltraChat(UltraChatSettings(cache_dir=str(tmp_path / "ds"))).size()
    assert str(caught.value) == OFFLINE_MESSAGE
    with pytest.raises(DataError, match="offline or not cached"):
        GPT2TokenizerFactory(GPT2TokenizerSettings(cache_dir=str(tmp_path / "hub"))).load([], tmp_path)
    with pytest.raises(DataError, match="offline or not cached"):
        GPT2Embedding(GPT2EmbeddingSettings(cache_dir=str(tmp_path / "hub"))).load(8, 4, torch.Generator())
    assert time.perf_counter() - start < 5.0
    assert not hub_constants.HF_HUB_OFFLINE  # hub_offline() restored the library's flag


# --- streams and schemes -----------------------------------------------------------------------------


def test_stream_concatenates_samples_with_nothing_between(tmp_path: Path) -> None:
    stream = build_stream(["ab", "", "cde"], BytesTokenizer(), None, tmp_path / "s.ids")
    assert stream.ids.tolist() == [97, 98, 99, 100, 101]
    assert stream.boundaries.tolist() == [[0, 2], [2, 2], [2, 5]]
    cut = build_stream(["abcdef", "gh"], BytesTokenizer(), 3, tmp_path / "cut.ids")
    assert cut.ids.tolist() == list(b"abcgh") and cut.boundaries.tolist() == [[0, 3], [3, 5]]


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_stream_is_int32_ids_memory_mapped_from_its_cache_file(tmp_path: Path) -> None:
    """4 B per token on disk and in memory; int32 ids index the embedding as int64 ids do."""
    texts = ["hello", "", "wide world \u00e9"]
    built = build_stream(texts, BytesTokenizer(), None, tmp_path / "s.ids")
    assert built.ids.dtype == torch.int32 and built.boundaries.dtype == np.int64
    assert (tmp_path / "s.ids").read_bytes() == np.asarray(built.ids.tolist(), dtype="<i4").tobytes()
    read = corpus.read_stream(tmp_path / "s.ids", len(texts), BytesTokenizer.vocab_size)
    assert read is not None and mapped_file(read.ids.data_ptr()) == str((tmp_path / "s.ids").resolve())
    assert read.ids.tolist() == list("".join(texts).encode()) and torch.equal(read.ids, built.ids)
    assert np.array_equal(read.boundaries, built.boundaries)
    embedding = torch.nn.Embedding(256, 4)
    assert torch.equal(embedding(read.ids), embedding(read.ids.long()))
    end = read.boundaries[1][1]  # how the runner cuts a training prefix
    assert read.ids[:end].tolist() == list(b"hello")


def test_a_tokenizer_outside_its_vocabulary_is_named_and_leaves_no_file(tmp_path: Path) -> None:
    class Wild(BytesTokenizer):
        def encode(self, text: str) -> list[int]:
            return [300]

    with pytest.raises(DataError, match="tokenizer produced id 300 outside its vocab_size 256"):
        build_stream(["a"], Wild(), None, tmp_path / "s.ids")
    assert list(tmp_path.iterdir()) == []


def test_empty_text_list_and_empty_stream_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no documents"):
        build_stream([], BytesTokenizer(), None, tmp_path / "s.ids")
    with pytest.raises(DataError, match="tokenise to 0 tokens"):
        build_stream(["", ""], BytesTokenizer(), None, tmp_path / "s.ids")
    assert list(tmp_path.iterdir()) == []


ENCODE_SCRIPT = """
import resource, sys
from pathlib import Path
from newllm_kit.corpus import build_stream

class Wide:  # ids above 256: a Python list of them holds one int object (28 B) per token
    vocab_size, fingerprint = 50257, "wide"
    def encode(self, text):
        return [1000 + b for b in text.encode()]

texts = ["w" * 200] * (int(sys.argv[2]) // 200)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream = build_stream(texts, Wide(), None, Path(sys.argv[1]))
print(len(stream), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_tokenising_a_long_stream_keeps_memory_bounded(tmp_path: Path) -> None:
    """4M tokens: as a Python list they would take 144 MB (plus 32 MB as an int64 tensor); streamed to
    the cache file a batch of documents at a time, the peak grows by less than the int32 stream itself."""
    tokens = 4_000_000
    result = subprocess.run([sys.executable, "-c", ENCODE_SCRIPT, str(tmp_path / "s.ids"), str(tokens)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    length, grown_kib = map(int, result.stdout.split())
    assert length == tokens and (tmp_path / "s.ids").stat().st_size == 4 * tokens
    assert grown_kib * 1024 < 4 * tokens


def test_schemes_pick_and_join_turns(tmp_path: Path) -> None:
    docs = [["Hello there.", "Hi!", "Bye."], ["x" * 600, "y"]]
    expected = {"first_turn": ["Hello there.", "x" * 600], "first_turn_128": ["Hello there.", "x" * 128],
                "all_turns": ["Hello there.\nHi!\nBye.", "x" * 600 + "\ny"],
                "all_turns_space_512": ["Hello there. Hi! Bye.", "x" * 512]}
    for scheme, texts in expected.items():
        train, _, _, fingerprints = load_streams(Memory([*docs, ["val"]]), scheme, BytesFactory(),
                                                 range(0, 2), range(2, 3), tmp_path)
        pieces = [bytes(train.ids[a:b].tolist()).decode() for a, b in train.boundaries.tolist()]
        assert pieces == texts, scheme
        assert fingerprints["scheme"] == scheme


def test_first_turn_128_truncates_each_sample_to_128_gpt2_tokens(gpt2_dir: Path, tmp_path: Path) -> None:
    source = local_ultrachat(make_ultrachat_parquet(tmp_path / "data", 24), tmp_path)
    factory = GPT2TokenizerFactory(GPT2TokenizerSettings(name_or_path=str(gpt2_dir), expect_vocab=None))
    t1, _, tokenizer, _ = load_streams(source, "first_turn_128", factory, range(20), range(20, 24), tmp_path)
    t2, _, _, _ = load_streams(source, "first_turn", factory, range(20), range(20, 24), tmp_path)
    full = [b - a for a, b in t2.boundaries.tolist()]
    cut = [b - a for a, b in t1.boundaries.tolist()]
    assert cut == [min(n, 128) for n in full] and max(full) > 128 and 128 in cut
    long_row = full.index(max(full))
    (a, b), (c, _) = t1.boundaries[long_row], t2.boundaries[long_row]
    assert t1.ids[a:b].tolist() == t2.ids[c:c + 128].tolist()
    assert tokenizer.vocab_size == FIXTURE_GPT2_VOCAB


def test_rows_are_read_from_the_source_a_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the scheme's text of a batch is kept before the next batch is read (UltraChat rows hold
    every turn; the first-turn schemes keep one)."""
    asked: list[list[int]] = []

    class Counting(Memory):
        def documents(self, rows: Sequence[int]) -> list[list[str]]:
            asked.append(list(rows))
            return super().documents(rows)

    monkeypatch.setattr(corpus, "DOCUMENT_BATCH", 3)
    source = Counting([[f"question {i}", "a long answer"] for i in range(10)])
    train, _, _, _ = load_streams(source, "first_turn", BytesFactory(), range(1, 9), range(9, 10), tmp_path)
    assert asked == [[1, 2, 3], [4, 5, 6], [7, 8], [9]]
    assert bytes(train.ids.tolist()).decode() == "".join(f"question {i}" for i in range(1, 9))


def test_overlapping_rows_name_both_ranges() -> None:
    with pytest.raises(DataError, match=r"training rows 0…1049 overlap validation rows 1000…1049"):
        Split.of(0, 1050, 1000, 50).check(5000)
    Split.of(0, 1000, 1000, 50).check(1050)


def test_rows_beyond_the_corpus_state_its_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the corpus has 30 rows"):
        Split.of(0, 20, 25, 10).check(30)
    with pytest.raises(DataError, match="the corpus has 3 rows"):
        load_streams(Memory([["a"], ["b"], ["c"]]), "first_turn", BytesFactory(), range(2), range(2, 4),
                     tmp_path)


def test_streams_are_cached_by_corpus_scheme_tokenizer_and_rows(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = Memory([[f"document number {i}"] for i in range(12)])
    first = load_streams(source, "first_turn", BytesFactory(), range(0, 8), range(8, 12), tmp_path)
    assert len(list(tmp_path.glob("stream-*.ids"))) == len(list(tmp_path.glob("stream-*.bounds.npy"))) == 2

    def no_tokenising(*args: object) -> None:
        raise AssertionError("a cached stream was tokenised again")

    monkeypatch.setattr(corpus, "build_stream", no_tokenising)
    again = load_streams(source, "first_turn", BytesFactory(), range(0, 8), range(8, 12), tmp_path)
    assert torch.equal(first[0].ids, again[0].ids)
    assert np.array_equal(first[1].boundaries, again[1].boundaries)
    assert first[3] == again[3] and set(first[3]) == {"corpus", "tokenizer", "scheme", "split"}
    monkeypatch.undo()
    other = load_streams(source, "all_turns", BytesFactory(), range(0, 8), range(8, 12), tmp_path)
    assert other[3]["split"] != first[3]["split"]
    smaller = load_streams(source, "first_turn", BytesFactory(), range(0, 4), range(8, 12), tmp_path)
    assert smaller[3]["split"] == first[3]["split"]  # training sizes share one split: prefixes of one stream


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


def _pickled(path: Path) -> None:
    np.save(path, np.array([[0, 1]], dtype=object), allow_pickle=True)


def _gap(path: Path) -> None:
    bounds = np.load(path)
    bounds[-1, 0] += 1
    np.save(path, bounds)


def _out_of_vocabulary(path: Path) -> None:
    path.write_bytes(np.asarray([256], dtype="<i4").tobytes() + path.read_bytes()[4:])


@pytest.mark.parametrize(("suffix", "damage"), [
    (".ids", _truncate), (".ids", _out_of_vocabulary), (".ids", Path.unlink),
    (".bounds.npy", lambda p: p.write_bytes(b"not a .npy file")), (".bounds.npy", lambda p: p.write_bytes(b"")),
    (".bounds.npy", _pickled),
    (".bounds.npy", _gap), (".bounds.npy", Path.unlink),
])
def test_a_damaged_or_partial_stream_cache_is_rebuilt(tmp_path: Path, suffix: str,
                                                      damage: Callable[[Path], None]) -> None:
    source = Memory([[f"doc {i}"] for i in range(4)])
    train, val, _, _ = load_streams(source, "first_turn", BytesFactory(), range(0, 2), range(2, 4), tmp_path)
    expected = train.ids.clone(), val.ids.clone(), train.boundaries.copy()  # the damage reaches mapped pages
    for path in tmp_path.glob(f"stream-*{suffix}"):
        damage(path)
    train, val, _, _ = load_streams(source, "first_turn", BytesFactory(), range(0, 2), range(2, 4), tmp_path)
    assert torch.equal(train.ids, expected[0]) and torch.equal(val.ids, expected[1])
    assert np.array_equal(train.boundaries, expected[2])


def test_a_cache_of_the_previous_format_is_never_read(tmp_path: Path) -> None:
    """Format 1 was safetensors under another key: format 2 neither finds nor trusts such files."""
    source = Memory([[f"doc {i}"] for i in range(4)])
    (tmp_path / "stream-0123456789abcdef0123456789abcdef.safetensors").write_bytes(b"format 1")
    train, _, _, _ = load_streams(source, "first_turn", BytesFactory(), range(0, 2), range(2, 4), tmp_path)
    assert bytes(train.ids.tolist()) == b"doc 0doc 1"


def test_ultrachat_gpt2_tokenizer_and_embedding_from_local_dirs(gpt2_dir: Path, tmp_path: Path) -> None:
    """The offline recipe in experiments/v2.toml: data.path, tokenizer and embedding name_or_path."""
    source = local_ultrachat(make_ultrachat_jsonl(tmp_path / "data", 40), tmp_path)
    settings = GPT2TokenizerSettings(name_or_path=str(gpt2_dir), expect_vocab=FIXTURE_GPT2_VOCAB)
    train, val, tokenizer, fingerprints = load_streams(source, "first_turn", GPT2TokenizerFactory(settings),
                                                       range(30), range(30, 40), tmp_path / "cache")
    assert len(train.boundaries) == 30 and len(val.boundaries) == 10
    assert tokenizer.decode(train.ids[slice(*train.boundaries[0])].tolist()) == first_turns([0])[0][0]
    assert fingerprints["corpus"] == source.fingerprint()
    model_dir = make_gpt2_model_dir(tmp_path / "model", FIXTURE_GPT2_VOCAB, 16)
    table = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(model_dir))).load(tokenizer.vocab_size, 16,
                                                                                  torch.Generator())
    assert table.shape == (FIXTURE_GPT2_VOCAB, 16) and table[train.ids].shape == (len(train), 16)


# --- text, embedded, synthetic, random -----------------------------------------------------------------


def test_text_source_reads_txt_blocks_and_jsonl_rows(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph,\nstill first.\n\n  \nSecond one.\n\n\n")
    jsonl = tmp_path / "chat.jsonl"
    chat = {"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]}
    jsonl.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps(chat))
    source = TextFiles(TextSettings(paths=[str(txt), str(jsonl)]))
    assert source.documents(range(source.size())) == [["First paragraph,\nstill first."], ["Second one."],
                                                      ["plain"], ["q", "a"]]
    before = source.fingerprint()
    txt.write_text("Changed.\n")
    assert TextFiles(TextSettings(paths=[str(txt), str(jsonl)])).fingerprint() != before


def test_text_source_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected an object with 'text'"):
        TextFiles(TextSettings(paths=[str(bad)])).size()
    with pytest.raises(DataError, match="does not exist"):
        TextFiles(TextSettings(paths=[str(tmp_path / "missing.txt")])).size()
    with pytest.raises(ValidationError):
        TextSettings(paths=[])


def test_embedded_corpus_is_deterministic_prose_from_python_itself() -> None:
    a, b = Embedded(), Embedded()
    assert a.size() == b.size() > 200
    docs = a.documents(range(a.size()))
    assert docs == b.documents(range(b.size()))
    assert all(len(d) == 1 and len(d[0].split()) >= MIN_WORDS for d in docs)
    assert a.fingerprint() == b.fingerprint()
    assert a.describe()["python"] == ".".join(map(str, sys.version_info[:3]))


def test_synthetic_entropy_rate_matches_a_long_sample() -> None:
    """Plug-in conditional entropy H(next | last k words) over 400k sampled transitions vs the exact rate.

    Each of the 1000 sampled sequences starts from π, so every position is a draw from the stationary chain.
    """
    for order, vocab, branching in [(1, 16, 4), (2, 6, 3)]:
        source = Synthetic(SyntheticSettings(order=order, vocab=vocab, branching=branching, seed=3))
        chain = source.chain
        words = chain.sample(np.random.default_rng(1), 1000, 400 + order)
        states = sum(words[:, i:400 + i] * vocab ** (order - 1 - i) for i in range(order))
        pairs = (states * vocab + words[:, order:]).ravel()
        joint = np.bincount(pairs, minlength=chain.states * vocab).reshape(chain.states, vocab)
        state_counts = joint.sum(axis=1, keepdims=True)
        nonzero = joint > 0
        estimate = float((joint[nonzero] * np.log((state_counts / np.maximum(joint, 1))[nonzero])).sum()
                         / joint.sum())
        assert estimate == pytest.approx(source.entropy_rate_nats(), abs=0.01)
        assert state_counts[:, 0] / state_counts.sum() == pytest.approx(chain.stationary, abs=0.01)
        assert source.best_ppl_per_word() == pytest.approx(math.exp(source.entropy_rate_nats()))


def test_synthetic_documents_are_seeded_and_stable_across_corpus_sizes() -> None:
    small = Synthetic(SyntheticSettings(docs=300, words_per_doc=12, seed=5))
    large = Synthetic(SyntheticSettings(docs=900, words_per_doc=12, seed=5))
    assert small.documents(range(300)) == large.documents(range(300))
    same, reseeded = (Synthetic(SyntheticSettings(docs=300, words_per_doc=12, seed=s)) for s in (5, 6))
    assert small.fingerprint() == same.fingerprint() != reseeded.fingerprint()
    words = small.documents([0])[0][0].split()
    assert len(words) == 12 and all(w[0] == "w" and 0 <= int(w[1:]) < 64 for w in words)


def test_synthetic_token_bounds(tmp_path: Path) -> None:
    """Both bounds from the chain's definition, recomputed here: h = Σ_s π(s)·H(next word | s), and a
    document of 30 words holds H(π) for its first (order 1) word plus h for each of the other 29."""
    source = Synthetic(SyntheticSettings(docs=60, words_per_doc=30))
    _, val, _, _ = load_streams(source, "first_turn", BytesFactory(), range(0, 40), range(40, 60), tmp_path)
    chain = source.chain
    h = float(chain.stationary @ entr(chain.probs).sum(axis=1))
    document = float(entr(chain.stationary).sum()) + 29 * h
    assert len(val.boundaries) == 20  # the validation documents
    assert source.best_token_ppl_for(20 * 30, len(val)) == pytest.approx(math.exp(h * 600 / len(val)), rel=1e-10)
    assert source.best_token_ppl(len(val), val) == pytest.approx(math.exp(20 * document / len(val)), rel=1e-10)


def test_synthetic_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="branching"):
        SyntheticSettings(vocab=3, branching=4)
    with pytest.raises(ValidationError, match="too large"):
        SyntheticSettings(order=5, vocab=64)


def test_random_embedding_is_seeded_normal() -> None:
    source = RandomEmbedding(RandomEmbeddingSettings(std=0.02))
    a = source.load(1000, 32, torch.Generator().manual_seed(1))
    b = source.load(1000, 32, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1000, 32)
    assert a.std().item() == pytest.approx(0.02, rel=0.05)
    assert source.fingerprint() != RandomEmbedding(RandomEmbeddingSettings(std=0.1)).fingerprint()


# --- files that are not what they claim to be: one line naming the file (and line) ---------------------


CHAT = json.dumps({"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]})


@pytest.mark.parametrize(("name", "content", "message"), [
    ("latin1.txt", "Caf\xe9 au lait.\n\nSecond.\n".encode("latin-1"), r"latin1\.txt:1: not UTF-8 text \(byte 0xe9\)"),
    ("late.txt", b"Fine.\n\nStill fine.\n\xff\n", r"late\.txt:4: not UTF-8 text \(byte 0xff\)"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"image\.txt is binary \(it holds NUL bytes\)"),
    ("bad.jsonl", f"{CHAT}\n\n{{\"text\": \"unterminated\n{CHAT}\n".encode(), r"bad\.jsonl:3: invalid JSON at column"),
    ("cp1252.jsonl", f'{CHAT}\n{{"text": "caf\xe9"}}\n'.encode("cp1252"), r"cp1252\.jsonl:2: not UTF-8 text"),
    ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", r"deep\.jsonl:1: JSON nested too deeply"),
    ("binary.jsonl", bytes(range(256)) * 4, r"binary\.jsonl:1: holds NUL bytes, so the file is binary"),
])
def test_text_source_refuses_files_that_are_not_utf8_text(tmp_path: Path, name: str, content: bytes,
                                                          message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^data source 'text': .*{message}") as caught:
        TextFiles(TextSettings(paths=[str(path)])).size()
    assert "\n" not in str(caught.value)


def test_jsonl_lines_end_only_at_newline(tmp_path: Path) -> None:
    """U+2028 is legal inside a JSON string; str.splitlines() would cut the row there."""
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert TextFiles(TextSettings(paths=[str(path)])).documents([0]) == [["one\u2028two"]]


def test_a_lone_surrogate_is_named_by_row_before_the_tokenizer_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["fine", "also fine", "bad \ud800 here", "ok"]))
    source = TextFiles(TextSettings(paths=[str(path)]))
    with pytest.raises(DataError, match=r"data: row 2: character 4 is '\\ud800', a lone surrogate"):
        load_streams(source, "first_turn", BytesFactory(), range(0, 3), range(3, 4), tmp_path)


def test_documents_that_are_not_text_are_named_by_row() -> None:
    scheme = corpus.get_scheme("all_turns")
    with pytest.raises(DataError, match=r"data: row 8: a turn is int, not text"):
        corpus.scheme_texts([["a"], ["b", 3]], scheme, [7, 8])  # type: ignore[list-item]
    with pytest.raises(DataError, match=r"returned 1 documents for 2 rows"):
        corpus.scheme_texts([["a"]], scheme, [7, 8])


def test_a_tokenizer_factory_returning_the_wrong_object_is_named(tmp_path: Path) -> None:
    class Broken:
        def load(self, train_texts: Sequence[str], cache_dir: Path) -> object:
            return "not a tokenizer"

    source = Memory([["one two"], ["three four"]])
    with pytest.raises(PluginError, match=r"Broken\.load\(\) returned str, which lacks 'decode', 'fingerprint', "
                                          r"'vocab_size' required by newllm_kit\.protocols\.Tokenizer"):
        load_streams(source, "first_turn", Broken(), range(0, 1), range(1, 2), tmp_path)  # type: ignore[arg-type]


def _corrupt_pages(path: Path) -> Path:
    """Overwrite the first half of the column data; the footer (schema) stays readable."""
    data = bytearray(path.read_bytes())
    data[100:len(data) // 2] = b"\x55" * (len(data) // 2 - 100)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1" + b"\x00 garbage" * 100) and d / "x.parquet",
     r"x\.parquet: not a readable parquet file \(ArrowInvalid: Parquet magic bytes not found"),
    (lambda d: _corrupt_pages(make_ultrachat_parquet(d, 40)),
     r"train_sft-00000-of-00001\.parquet: not a readable parquet file"),
    (lambda d: (d / "train_sft.jsonl").write_text(f"{CHAT}\n{CHAT}\n{CHAT[:-3]}\n{CHAT}\n") and d / "train_sft.jsonl",
     r"train_sft\.jsonl:3: invalid JSON at column"),
    (lambda d: (d / "train_sft.jsonl").write_bytes(f"{CHAT}\n{CHAT}\n".encode() + b'{"messages": "\xff"}\n')
     and d / "train_sft.jsonl", r"train_sft\.jsonl:3: not UTF-8 text"),
    (lambda d: (d / "train_sft.jsonl").write_bytes(b'{"messages": "\xe9t\xe9"}\n') and d / "train_sft.jsonl",
     r"train_sft\.jsonl:1: not UTF-8 text"),
    (lambda d: (d / "train_sft.jsonl").write_text(f"{CHAT}\n[1, 2]\n{CHAT}\n") and d / "train_sft.jsonl",
     r"train_sft\.jsonl:2: expected an object with a 'messages' list"),
])
def test_ultrachat_copy_that_cannot_be_read_names_the_file_and_line(
        tmp_path: Path, make: Callable[[Path], Path], message: str, capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    path = make(folder)
    with pytest.raises(DataError, match=rf"^data source 'ultrachat': .*{message}") as caught:
        local_ultrachat(path, tmp_path).size()
    assert "\n" not in str(caught.value)
    assert "Failed to" not in capfd.readouterr().err  # the datasets logger stays quiet: ours is the message
