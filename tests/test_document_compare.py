"""Per-document validation sums: recipes' evaluations add them up by the rule (a position belongs to
the document of the token it predicts), over ranks too; the core's file beside the record is read
back only when it adds up to the record; `compare` resamples the documents of units that share them."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from newllm_kit_plugins.cvfp.phase2 import Phase2Data, Phase2Settings, _pass, evaluate
from scipy import stats as scipy_stats
from test_compare import record
from test_phase2 import VAL, CPURunner, ThreadRank, TinyModel
from thread_ranks import run_ranks

from newllm_kit import bootstrap, documents
from newllm_kit.compare import compare
from newllm_kit.rundir import RunDir

SPANS = np.array([[0, 5], [5, 6], [6, 6], [6, 15], [15, 23]])  # VAL's 23 tokens; one document is empty


def by_document(model: TinyModel, data: Phase2Data) -> np.ndarray:
    """The reference: each document's positions (those predicting its tokens) evaluated on their own."""
    rows = []
    for start, stop in SPANS:
        positions = range(max(start - 1, 0), stop - 1) if stop > 1 else range(0)
        nll, hits = _pass(model, data, positions, CPURunner(), 4, None) if len(positions) else (0.0, 0)
        rows.append([nll, hits, len(positions)])
    return np.array(rows)


def test_cvfp_evaluation_sums_each_document_by_the_token_it_predicts() -> None:
    model, data = TinyModel(), Phase2Data(VAL.contexts, VAL.ids, documents=SPANS)
    out = evaluate(model, data, Phase2Settings(batch_size=4, ce_chunk=3), CPURunner(micro=3))
    assert out.documents is not None and out.documents.shape == (5, 3)
    expected = by_document(model, data)
    assert out.documents[:, 1:].tolist() == expected[:, 1:].tolist()
    assert out.documents[:, 2].tolist() == [4, 1, 0, 9, 8]  # the first document's first token is not predicted
    np.testing.assert_allclose(out.documents[:, 0], expected[:, 0], rtol=1e-12, atol=1e-12)
    assert documents.problem(out.documents, out.nll_sum, out.correct, out.count, len(SPANS)) is None
    assert evaluate(model, Phase2Data(VAL.contexts, VAL.ids), Phase2Settings(batch_size=4), CPURunner()).documents \
        is None  # boundaries not given: no per-document sums


def test_a_retried_pass_counts_each_document_once() -> None:
    model, data = TinyModel(), Phase2Data(VAL.contexts, VAL.ids, documents=SPANS)
    model.oom_once_above = 2  # the first micro-batch above 2 rows fails; the pass is retried smaller
    runner = CPURunner(micro=8)
    out = evaluate(model, data, Phase2Settings(batch_size=8), runner)
    assert runner.ooms == 1 and out.documents is not None
    assert out.documents[:, 2].sum() == out.count == 22


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_their_shards_per_document(world: int) -> None:
    single = evaluate(TinyModel(), Phase2Data(VAL.contexts, VAL.ids, documents=SPANS), Phase2Settings(batch_size=4),
                      CPURunner())
    board: dict[str, Any] = {"barrier": threading.Barrier(world)}
    outs: list[Any] = [None] * world
    models = [TinyModel() for _ in range(world)]  # built before the threads: TinyModel seeds torch's generator

    def rank(r: int) -> None:
        outs[r] = evaluate(models[r], Phase2Data(VAL.contexts, VAL.ids, documents=SPANS),
                           Phase2Settings(batch_size=4), ThreadRank(r, world, board))

    run_ranks(world, rank)
    assert single.documents is not None
    for out in outs:
        assert out.documents[:, 1:].tolist() == single.documents[:, 1:].tolist()
        np.testing.assert_allclose(out.documents[:, 0], single.documents[:, 0], rtol=1e-12)


def test_the_file_beside_the_record_is_read_only_when_it_adds_up(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    sums = np.array([[10.5, 2, 4], [20.25, 3, 6]])
    documents.write(run, "A-100", sums)
    body = {"val_documents": documents.path("A-100"), "val_tokens": 11, "val_ppl": float(np.exp(30.75 / 10)),
            "val_acc": 0.5}
    got, warning = documents.read(tmp_path, body)
    assert warning is None and got is not None and got.tolist() == sums.tolist()
    assert documents.read(tmp_path, {**body, "val_acc": 0.4})[1] is not None
    assert "outside" in str(documents.read(tmp_path, {**body, "val_documents": "../x.json"})[1])
    (tmp_path / "documents" / "A-100.json").write_text("{not json")
    assert "unreadable" in str(documents.read(tmp_path, body)[1])


def _run_with_documents(folder: Path, seeds: dict[str, list[int]], gap: float, damage: bool = False) -> Path:
    """Two models on the same 60 documents; B's NLL per token is A's plus `gap` plus noise per document."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 80, size=60).astype(float)
    difficulty = 5.0 + rng.normal(0, 0.3, size=60)
    records = []
    run = RunDir(folder)
    folder.mkdir(parents=True)
    for model, offset in (("A", 0.0), ("B", gap)):
        for seed in seeds[model]:
            nll = tokens * (difficulty + offset + rng.normal(0, 0.01) + rng.normal(0, 0.02, size=60))
            hits = np.floor(tokens * 0.1)
            sums = np.stack([nll, hits, tokens], axis=1)
            unit = f"{model}-100-s{seed}"
            documents.write(run, unit, sums)
            count = int(tokens.sum())
            records.append(record(model, 100, seed, float(np.exp(nll.sum() / count)), val_tokens=count + 1,
                                  val_acc=hits.sum() / count, val_documents=documents.path(unit)))
    if damage:
        (folder / records[0]["val_documents"]).write_text(json.dumps({"nll": [1.0], "hits": [0], "tokens": [1]}))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_compare_adds_the_document_bootstrap_to_the_seed_interval(tmp_path: Path) -> None:
    run = _run_with_documents(tmp_path / "r", {"A": [1, 2, 3], "B": [1, 2, 3]}, gap=0.02)
    (only,) = compare([run], "val_ppl", "model", False)["comparisons"]
    seeds_only = compare([_run_with_documents(tmp_path / "s", {"A": [1, 2, 3], "B": [1, 2, 3]}, 0.02, damage=True)],
                         "val_ppl", "model", False)
    assert only["method"] == "welch+documents" and only["documents"] == 60
    # the reference: Welch on the seeds' NLL (scipy), widened by the spread of the paired document bootstrap
    # of the seed-averaged sums, with Welch–Satterthwaite degrees of freedom (documents: infinite)
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    nll = {m: [math.log(r["val_ppl"]) for r in records if r["model"] == m] for m in "AB"}
    seeds = scipy_stats.ttest_ind(nll["A"], nll["B"], equal_var=False)
    difference = float(np.mean(nll["A"]) - np.mean(nll["B"]))
    seeds_se = difference / seeds.statistic
    sums = {m: [json.loads((run / f"documents/{m}-100-s{s}.json").read_text()) for s in (1, 2, 3)] for m in "AB"}
    replicates = bootstrap.mean_differences(*(np.mean([row["nll"] for row in sums[m]], axis=0) for m in "AB"),
                                            np.array(sums["A"][0]["tokens"], dtype=float))
    se2 = seeds_se**2 + np.var(replicates, ddof=1)
    half = scipy_stats.t.ppf(0.975, seeds.df * se2**2 / seeds_se**4) * math.sqrt(se2)
    assert only["difference"] == pytest.approx(difference, rel=1e-12)
    assert only["ci"] == pytest.approx([difference - half, difference + half], rel=1e-9)
    (fallback,) = seeds_only["comparisons"]
    assert fallback["method"] == "welch" and fallback["documents"] is None
    assert any("do not match the record" in w and "seeds only" in w for w in seeds_only["warnings"])


def test_one_seed_a_side_gets_the_documents_percentile_interval(tmp_path: Path) -> None:
    run = _run_with_documents(tmp_path / "r", {"A": [1], "B": [1]}, gap=0.05)
    (only,) = compare([run], "val_ppl", "model", False)["comparisons"]
    rows = [json.loads((run / f"documents/{m}-100-s1.json").read_text()) for m in ("A", "B")]
    tokens = np.array(rows[0]["tokens"], dtype=float)
    replicates = bootstrap.mean_differences(np.array(rows[0]["nll"]), np.array(rows[1]["nll"]), tokens)
    assert only["method"] == "documents"
    assert only["ci"] == pytest.approx(list(np.percentile(replicates, [2.5, 97.5])))
    assert only["verdict"].startswith("A lower PPL than B by ") and only["verdict"].endswith("distinguishable")


def test_lm_recurrent_evaluation_sums_per_document() -> None:
    from newllm_kit_plugins.lm.recipe import evaluate as lm_evaluate
    from test_lm import tiny_gru

    model = tiny_gru().double().eval()
    ids = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(2))
    out = lm_evaluate(model, ids, CPURunner(), window=7, stride=None, tokens=1, ce_chunk=5, documents=SPANS)
    assert out.documents is not None and out.documents[:, 2].tolist() == [4, 1, 0, 9, 8]
    assert documents.problem(out.documents, out.nll_sum, out.correct, out.count, len(SPANS)) is None


def test_a_run_saves_each_units_sums_and_compare_resamples_them(tmp_path: Path) -> None:
    """End to end on the micro run of tests/test_seeds.py, with a second model and two seeds."""
    from test_seeds import write_micro

    from newllm_kit.plugins import load_plugins
    from newllm_kit.run import execute

    extra = '\n[[models]]\nlabel = "B"\nvariant = "gradual-reduction"\nlayers = 1\ncontext_dim = 8\nembedding_dim = 8\n'
    result = execute(write_micro(tmp_path, extra), ["experiment.seeds=[1, 2]"], tmp_path / "runs", False, "none",
                     load_plugins())
    run_dir = Path(result["run_dir"])
    for r in result["results"]:
        sums, warning = documents.read(run_dir, r)
        assert warning is None and sums is not None and sums.shape == (6, 3)  # the 6 validation documents
    (only,) = compare([run_dir], "val_ppl", "model", False)["comparisons"]
    assert only["documents"] == 6 and only["method"] in ("welch+documents", "none")
