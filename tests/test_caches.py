"""Token caches carry the sha256 of what was written; a run directory holds one set of fingerprints.

A cache whose content changed (zeroed ids, another valid cache swapped in, its hash record lost)
is rebuilt with a warning naming it and gives the numbers of a clean run; a resume whose
recomputed fingerprints differ from meta.json is refused in one line naming the component.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import ids_sha256, synthetic_ids
from test_experiment import read_results, without_timings, write_tiny

from newllm_kit.corpus import build_stream, cached_stream, get_scheme, read_stream
from newllm_kit.errors import UserError
from newllm_kit.plugins import load_plugins
from newllm_kit.resume import pin_fingerprints
from newllm_kit.run import execute
from newllm_kit.rundir import RunDir

TEXTS = [f"document {i}: " + "abc " * (i % 7 + 1) for i in range(40)]
OTHER_TEXTS = [f"another {i}: " + "xyz " * (i % 5 + 2) for i in range(40)]


class Bytes:
    """The smallest tokenizer: UTF-8 bytes."""

    vocab_size = 256
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def files(ids: Path) -> list[Path]:
    stem = ids.name.removesuffix(".ids")
    return [ids, ids.with_name(f"{stem}.bounds.npy"), ids.with_name(f"{stem}.sha256")]


def cached(path: Path, texts: list[str] = TEXTS) -> tuple[list[int], str, list[str]]:
    """(ids, sha256, warnings) of `cached_stream` on `texts` at `path`."""
    warnings: list[str] = []
    stream = cached_stream(texts, Bytes(), get_scheme("first_turn"), path, warnings.append)
    return stream.ids.tolist(), stream.sha256, warnings


@pytest.fixture
def clean(tmp_path: Path) -> tuple[Path, list[int], str]:
    path = tmp_path / "stream-a.ids"
    stream = build_stream(TEXTS, Bytes(), None, path)
    return path, stream.ids.tolist(), stream.sha256


def test_the_hash_of_the_ids_is_recorded_beside_them_in_sha256sum_format(clean: tuple[Path, list[int], str]) -> None:
    path, ids, digest = clean
    ids_file, bounds_file, record = files(path)
    assert digest == ids_sha256(np.asarray(ids))
    assert record.read_text().splitlines() == [
        f"{digest}  {ids_file.name}", f"{hashlib.sha256(bounds_file.read_bytes()).hexdigest()}  {bounds_file.name}"]


def test_an_intact_cache_is_reused_without_a_word(clean: tuple[Path, list[int], str]) -> None:
    path, ids, digest = clean
    before = path.stat().st_mtime_ns
    assert cached(path) == (ids, digest, [])
    assert path.stat().st_mtime_ns == before  # read, not rewritten


def test_zeroed_ids_are_rebuilt_with_a_warning_naming_the_cache(clean: tuple[Path, list[int], str]) -> None:
    path, ids, digest = clean
    data = bytearray(path.read_bytes())
    data[40:80] = bytes(40)  # ten ids set to 0: still in the vocabulary, size and bounds unchanged
    path.write_bytes(bytes(data))
    assert read_stream(path, len(TEXTS), 256, lambda _: None) is None
    again, again_digest, warnings = cached(path)
    assert (again, again_digest) == (ids, digest)
    assert len(warnings) == 1 and str(path) in warnings[0] and "does not match the sha256" in warnings[0]
    assert cached(path)[2] == []  # the rebuilt cache is trusted again


def test_changed_boundaries_are_rebuilt_too(clean: tuple[Path, list[int], str]) -> None:
    path, ids, _ = clean
    bounds = files(path)[1]
    table = np.load(bounds)
    table[[3, 4]] = [[table[3, 0], table[3, 0] + 1], [table[3, 0] + 1, table[4, 1]]]  # still consistent
    np.save(bounds, table, allow_pickle=False)
    again, _, warnings = cached(path)
    assert again == ids and len(warnings) == 1 and bounds.name in warnings[0]


def test_another_valid_cache_swapped_in_is_rebuilt(clean: tuple[Path, list[int], str], tmp_path: Path) -> None:
    path, ids, digest = clean
    other = tmp_path / "stream-b.ids"
    build_stream(OTHER_TEXTS, Bytes(), None, other)  # the same number of documents: every size check passes
    for source, target in zip(files(other), files(path), strict=True):
        shutil.copyfile(source, target)  # its hash record too: it names the other cache's files
    again, again_digest, warnings = cached(path)
    assert (again, again_digest) == (ids, digest)
    assert len(warnings) == 1 and str(path.parent) in warnings[0]


def test_a_cache_without_its_hash_record_is_not_trusted(clean: tuple[Path, list[int], str]) -> None:
    path, ids, digest = clean
    files(path)[2].unlink()
    again, again_digest, warnings = cached(path)
    assert (again, again_digest) == (ids, digest)
    assert len(warnings) == 1 and "no readable content hash" in warnings[0] and str(path) in warnings[0]


def test_no_cache_at_all_is_built_silently(tmp_path: Path) -> None:
    assert cached(tmp_path / "stream-new.ids")[2] == []


def test_a_swapped_bpe_tokenizer_cache_is_retrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers")
    from newllm_kit_plugins.tokens.simple import BPEFactory, BPESettings

    factory = BPEFactory(BPESettings(vocab_size=280))
    first = factory.load(TEXTS, tmp_path)
    other = factory.load(OTHER_TEXTS, tmp_path)
    path = factory.cache_path(TEXTS, tmp_path)
    capsys.readouterr()
    assert factory.load(TEXTS, tmp_path).fingerprint == first.fingerprint
    assert capsys.readouterr().err == ""  # intact: reused silently
    shutil.copyfile(factory.cache_path(OTHER_TEXTS, tmp_path), path)  # a valid tokenizer, trained on other rows
    assert other.fingerprint != first.fingerprint
    assert factory.load(TEXTS, tmp_path).fingerprint == first.fingerprint
    assert f"warning: tokenizer cache {path} does not match the sha256" in capsys.readouterr().err


def meta_with(run: RunDir, **fields: Any) -> None:
    run.write_json("meta.json", {"status": "running", **fields})


PRINTS = {"corpus": "c" * 64, "tokenizer": "t" * 64, "scheme": "first_turn", "split": "s" * 64,
          "embedding": "e" * 64, "train_ids": "a" * 64, "val_ids": "b" * 64}


def test_the_first_start_records_the_fingerprints_and_an_equal_set_passes(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    meta_with(run)
    pin_fingerprints(run, "", PRINTS)
    assert run.read_json("meta.json")["fingerprints"] == PRINTS
    pin_fingerprints(run, "", dict(PRINTS))


@pytest.mark.parametrize("component", sorted(PRINTS))
def test_a_resume_with_a_changed_fingerprint_is_refused_naming_it(tmp_path: Path, component: str) -> None:
    run = RunDir(tmp_path)
    meta_with(run, fingerprints=PRINTS)
    with pytest.raises(UserError, match=rf"^cannot resume .*: the {component} fingerprint differs from the run's "
                                        rf"meta\.json [^\n]*start a new run instead$"):
        pin_fingerprints(run, "", {**PRINTS, component: "0" * 64})


def test_each_sweep_variant_keeps_its_own_set(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    meta_with(run)
    other = {**PRINTS, "tokenizer": "u" * 64}
    pin_fingerprints(run, "bpe-64", PRINTS)
    pin_fingerprints(run, "bpe-128", other)  # a sweep over the tokenizer: a second set, not a conflict
    assert run.read_json("meta.json")["variant_fingerprints"] == {"bpe-64": PRINTS, "bpe-128": other}
    with pytest.raises(UserError, match="tokenizer fingerprint of sweep variant 'bpe-64'"):
        pin_fingerprints(run, "bpe-64", other)


def test_fingerprints_written_before_ids_were_hashed_are_compared_where_they_exist(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    old = {k: PRINTS[k] for k in ("corpus", "tokenizer", "scheme", "split")}
    meta_with(run, fingerprints=old)
    pin_fingerprints(run, "", PRINTS)
    with pytest.raises(UserError, match="split fingerprint"):
        pin_fingerprints(run, "", {**PRINTS, "split": "x" * 64})


ONE_SIZE = ["experiment.samples=[12]"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("caches")
    result = execute(write_tiny(tmp), ONE_SIZE, tmp / "runs", False, "none", load_plugins())
    return {**result, "tmp": tmp}


def stream_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("stream-*.ids"), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_a_run_records_the_token_hashes_in_meta_json(tiny_run: dict[str, Any]) -> None:
    meta = json.loads((Path(tiny_run["run_dir"]) / "meta.json").read_text())
    assert {"corpus", "tokenizer", "scheme", "split", "embedding"} <= meta["fingerprints"].keys()
    pinned = (meta["fingerprints"]["train_ids"], meta["fingerprints"]["val_ids"])
    assert pinned == (ids_sha256(synthetic_ids(range(12))), ids_sha256(synthetic_ids(range(300, 312))))
    cache = Path(tiny_run["tmp"]) / "runs" / "tiny" / ".cache"
    on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in stream_files(cache)}
    assert set(pinned) == on_disk  # the cached streams hold exactly those tokens


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zeroed", "swapped"])
def test_a_damaged_cache_gives_the_numbers_of_a_clean_run(tiny_run: dict[str, Any], tmp_path: Path, damage: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    shutil.copytree(Path(tiny_run["tmp"]) / "runs" / "tiny" / ".cache", out / "tiny" / ".cache")
    val, train = stream_files(out / "tiny" / ".cache")  # the validation stream is the smaller one
    if damage == "zeroed":
        data = bytearray(train.read_bytes())
        data[:2000] = bytes(2000)  # 500 training ids set to 0, as in the report that found this
        train.write_bytes(bytes(data))
    else:  # the validation cache, a valid cache of its own, in place of the training one
        for source, target in zip(files(val), files(train), strict=True):
            shutil.copyfile(source, target)
    capsys.readouterr()
    result = execute(write_tiny(tmp_path), ONE_SIZE, out, False, "none", load_plugins())
    assert f"warning: token cache {train.parent}" in capsys.readouterr().err
    assert without_timings(read_results(Path(result["run_dir"]))) == without_timings(
        read_results(Path(tiny_run["run_dir"])))


@pytest.mark.slow
def test_a_resume_whose_tokens_changed_is_refused(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny" / "resumed"
    shutil.copytree(Path(tiny_run["run_dir"]), run_dir)
    shutil.copytree(Path(tiny_run["tmp"]) / "runs" / "tiny" / ".cache", run_dir.parent / ".cache")
    for record in (run_dir / "units").glob("B-*/record.json"):  # unit B still to run
        record.unlink()
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["fingerprints"]["val_ids"] = "0" * 64  # as if the validation rows now tokenised differently
    (run_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"cannot resume .*: the val_ids fingerprint differs from the run's "
                                        r"meta\.json .*the validation tokens differ"):
        execute(run_dir, [], run_dir.parent.parent, True, "none", load_plugins())
