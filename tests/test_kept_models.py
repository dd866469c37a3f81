"""Trained models outlive the run: models/<unit>/{best,final}/ load back through their plugins with
the same logits, `sample` is the recipe's computation and is seeded, and `evaluate` on the run's own
validation split gives the run's numbers back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fixtures import FIXTURE_GPT2_VOCAB, make_gpt2_tokenizer_dir, synthetic_experiment
from newllm_kit_plugins.cvfp.decode import CVFPDecoder
from newllm_kit_plugins.lm.decode import LMDecoder
from torch import nn

from newllm_kit.errors import UserError
from newllm_kit.evaluation import evaluate_run
from newllm_kit.kept_models import load_model, read_weights, unique_tensors
from newllm_kit.plugins import load_plugins
from newllm_kit.progress import NullProgress
from newllm_kit.protocols import EvalOutputs
from newllm_kit.run import execute
from newllm_kit.rundir import RunDir
from newllm_kit.sampling import SampleSettings, pick, sample
from newllm_kit.training import train_epochs

ROOT = Path(__file__).resolve().parents[1]
MIXED = synthetic_experiment("mixed", "[24]", freeze=False, experiment_keys='keep_models = "both"') + """
[solver]
name = "cvfp"
min_iterations = 2
max_iterations = 4
batch_size = 512
val_convergence_trials = 0

[phase2]
epochs = 4
patience = 4
batch_size = 128
learning_rate = 0.05

[lm]
epochs = 4
patience = 4
batch_size = 8
warmup_steps = 2
learning_rate = 0.05

[[models]]
label = "A"
variant = "gradual-reduction"
layers = 2
context_dim = 16
embedding_dim = 16
num_input_tokens = 2

[[models]]
label = "T"
architecture = "transformer"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 32

[[models]]
label = "G"
architecture = "gru"
embedding_dim = 16
hidden_size = 24
layers = 2
"""
UNITS = ("A-24", "T-24", "G-24")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three built-in architectures trained on the same tokens, every model kept (best and final).
    The table is trained (`freeze = false`), so the CVFP model keeps the values its contexts were solved with."""
    folder = tmp_path_factory.mktemp("kept")
    (folder / "mixed.toml").write_text(MIXED)
    result = execute(folder / "mixed.toml", [], folder / "runs", False, "none", load_plugins())
    return Path(result["run_dir"])


def record(run_dir: Path, unit: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((run_dir / "units" / unit / "record.json").read_text())
    return loaded


def kit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "newllm_kit", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def stream(run_dir: Path) -> torch.Tensor:
    text = "The river and the old mill stood by the bridge where the children played."
    return torch.tensor(list(text.encode()), dtype=torch.long)


# -- the folder and the weights --------------------------------------------------------------------

def test_every_unit_keeps_a_complete_best_and_final_folder(run_dir: Path) -> None:
    for unit in UNITS:
        for which in ("best", "final"):
            folder = run_dir / "models" / unit / which
            names = {p.name for p in folder.iterdir()}
            assert {"model.safetensors", "config.json", "config.toml", "metrics.json", "README.md"} <= names
            assert json.loads((folder / "metrics.json").read_text()) == record(run_dir, unit)
            description = json.loads((folder / "config.json").read_text())
            assert (description["unit"], description["which"], description["vocab_size"]) == (unit, which, 256)
            assert description["embedding"]["source"] == "random"
        assert not list((run_dir / "models" / unit).glob(".*"))  # nothing half-written left behind


def test_final_weights_differ_from_best_exactly_when_training_went_past_the_best_epoch(run_dir: Path) -> None:
    for unit in UNITS:
        best, _ = read_weights(run_dir / "models" / unit / "best" / "model.safetensors")
        final, _ = read_weights(run_dir / "models" / unit / "final" / "model.safetensors")
        r = record(run_dir, unit)
        same = all(torch.equal(best[k], final[k]) for k in best)
        assert same == (r["best_epoch"] == r["epochs_run"]), unit


def test_train_epochs_hands_back_the_last_epochs_weights_after_restoring_the_best() -> None:
    model = nn.Linear(1, 1, bias=False)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    losses = iter([1.0, 2.0, 3.0])  # epoch 1 is best; epochs 2 and 3 get worse

    def run_epoch(epoch: int) -> tuple[float, int]:
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        return 0.0, 1

    report = train_epochs(model, params, optimizer, epochs=3, patience=5, restore_best=True, phase="t",
                          run_epoch=run_epoch, evaluate=lambda: EvalOutputs(nll_sum=next(losses), count=1),
                          progress=NullProgress())
    assert model.weight.item() == 1.0 and report.best_epoch == 1 and report.ends_on_best
    assert report.final_weights is not None and float(report.final_weights["weight"]) == 3.0
    kept = train_epochs(model, params, optimizer, epochs=2, patience=5, restore_best=False, phase="t",
                        run_epoch=run_epoch, evaluate=lambda: EvalOutputs(nll_sum=5.0 - model.weight.item(), count=1),
                        progress=NullProgress())
    assert kept.final_weights is None and kept.ends_on_best  # the last epoch was the best


def test_shared_tensors_are_stored_once_and_tied_again_on_load(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embedding.weight

    unique, ties = unique_tensors(Tied().state_dict())
    assert sorted(unique) == ["embedding.weight"] and ties == {"head.weight": "embedding.weight"}
    from safetensors.torch import save_file

    save_file(unique, tmp_path / "w.safetensors", metadata={"ties": json.dumps(ties)})
    loaded, _ = read_weights(tmp_path / "w.safetensors")
    model = Tied()
    model.load_state_dict(loaded)
    assert model.head.weight is model.embedding.weight and torch.equal(model.head.weight, unique["embedding.weight"])


def test_a_kept_model_loads_back_with_the_same_logits_as_the_recorded_numbers(run_dir: Path) -> None:
    """Loading is checked against what the run computed: the loaded model's validation NLL (through the
    recipe's evaluate, below) is the record's; here, weights and logits survive a second round trip."""
    plugins = load_plugins()
    for unit in UNITS:
        kept = load_model(run_dir, unit, "best", plugins.registry)
        again = RunDir(run_dir)
        from newllm_kit.kept_models import KeptFiles, save_model

        files = KeptFiles(kept.config, [label for label, _ in kept.config.models].index(kept.description["label"]),
                          kept.recipe_name, kept.tokenizer, kept.kept.record)
        save_model(again, unit, "copy", kept.model, kept.kept.tensors, files)
        copy = load_model(run_dir, unit, "copy", plugins.registry)
        ids = stream(run_dir)
        first = kept.recipe.decoder(kept.model, kept.kept).feed(ids)
        second = copy.recipe.decoder(copy.model, copy.kept).feed(ids)
        assert first.shape == (ids.numel(), 256) and torch.equal(first, second), unit
        for name, tensor in kept.model.state_dict().items():
            assert torch.equal(tensor, copy.model.state_dict()[name]), (unit, name)


# -- sampling ------------------------------------------------------------------------------------

def rollout_logits(model: Any, inputs: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The CVFP computation by hand: c_i = F(c_{i-1}, x_i) one position at a time from zero, token inputs
    from the table the contexts were solved with, the head from the trained one."""
    table = model.embedding.weight.data
    model.embedding.weight.data = inputs.get("embedding.weight", table)
    tokens = model.token_inputs(ids)
    model.embedding.weight.data = table
    context, rows = torch.zeros(1, model.context_dim), []
    for i in range(ids.numel()):
        layers = model.context_block(context, tokens[i:i + 1])
        context = layers[-1]
        rows.append(F.linear(model.token_block(layers, tokens[i:i + 1]), table))
    return torch.cat(rows)


def test_cvfp_decoder_is_the_sequential_rollout_fed_at_once_or_token_by_token(run_dir: Path) -> None:
    kept = load_model(run_dir, "A-24", "best", load_plugins().registry)
    inputs = {k.removeprefix("input/"): v for k, v in kept.kept.tensors.items()}
    assert set(inputs) == {"embedding.weight"}  # the table trained in Phase 2: its solved values are kept
    assert not torch.equal(inputs["embedding.weight"], kept.model.embedding.weight)
    ids = stream(run_dir)
    expected = rollout_logits(kept.model, inputs, ids)
    at_once = CVFPDecoder(kept.model, kept.kept.tensors).feed(ids)
    one_by_one = CVFPDecoder(kept.model, kept.kept.tensors)
    stepped = torch.cat([one_by_one.feed(ids[i:i + 1]) for i in range(ids.numel())])
    assert torch.allclose(at_once, expected, atol=1e-5, rtol=0)
    assert torch.allclose(stepped, expected, atol=1e-5, rtol=0)


def test_lm_decoders_match_a_whole_stream_forward(run_dir: Path) -> None:
    plugins = load_plugins()
    ids = stream(run_dir)
    gru = load_model(run_dir, "G-24", "best", plugins.registry).model
    decoder = LMDecoder(gru)
    stepped = torch.cat([decoder.feed(ids[i:i + 5]) for i in range(0, ids.numel(), 5)])
    assert torch.allclose(stepped, gru(ids[None])[0], atol=1e-5, rtol=0)
    transformer = load_model(run_dir, "T-24", "best", plugins.registry).model
    decoder = LMDecoder(transformer)
    stepped = torch.cat([decoder.feed(ids[i:i + 7]) for i in range(0, ids.numel(), 7)])
    block = transformer.block_size  # 32: positions past it read the last 32 tokens only
    assert torch.allclose(stepped[:block], transformer(ids[None, :block])[0], atol=1e-5, rtol=0)
    for p in (block, block + 5, ids.numel() - 1):
        assert torch.allclose(stepped[p], transformer(ids[None, p - block + 1:p + 1])[0, -1], atol=1e-5, rtol=0)


def test_sample_is_seeded_and_greedy_sampling_follows_the_rollouts_argmax(run_dir: Path) -> None:
    kept = load_model(run_dir, "A-24", "best", load_plugins().registry)
    drawn = [sample(kept, "The river", SampleSettings(tokens=12, seed=s))["ids"] for s in (3, 3, 4)]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
    greedy = sample(kept, "The river", SampleSettings(tokens=8, temperature=0))
    inputs = {k.removeprefix("input/"): v for k, v in kept.kept.tensors.items()}
    ids = list(b"The river")
    for _ in range(8):
        ids.append(int(rollout_logits(kept.model, inputs, torch.tensor(ids))[-1].argmax()))
    assert greedy["ids"] == ids[len(b"The river"):]
    assert greedy["text"] == bytes(greedy["ids"]).decode("utf-8", errors="replace")


def test_pick_draws_only_among_the_top_k() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 4.5])
    generator = torch.Generator().manual_seed(0)
    seen = {pick(logits, SampleSettings(top_k=2), generator) for _ in range(200)}
    assert seen == {1, 4}
    assert pick(logits, SampleSettings(temperature=0), generator) == 1


# -- evaluation ----------------------------------------------------------------------------------

def test_evaluate_on_the_runs_own_validation_split_gives_its_numbers_back(run_dir: Path) -> None:
    lines = evaluate_run(run_dir, None, "best", [], load_plugins().registry, None, print)
    assert sorted(line["unit"] for line in lines) == sorted(UNITS)
    for line in lines:
        r = record(run_dir, line["unit"])
        assert line["val_tokens"] == r["val_tokens"]
        assert math.isclose(line["val_ppl"], r["val_ppl"], rel_tol=1e-9), line["unit"]
        assert line["val_acc"] == r["val_acc"]
        for name, value in r["metrics"].items():  # null in JSON: a metric without its input (NaN)
            got = line["metrics"][name]
            assert (math.isnan(got) if value is None else math.isclose(got, value, rel_tol=1e-9)), (line["unit"], name)
    pinned = json.loads((run_dir / "meta.json").read_text())["fingerprints"]
    assert {line["data"]["fingerprints"]["val_ids"] for line in lines} == {pinned["val_ids"]}
    written = (run_dir / "evaluations" / "synthetic-first_turn-300-12.jsonl").read_text().splitlines()
    assert [json.loads(text)["unit"] for text in written][-3:] == [line["unit"] for line in lines]


def test_evaluate_on_other_rows_scores_those_rows(run_dir: Path) -> None:
    (line,) = evaluate_run(run_dir, "T-24", "best", ["data.val.start=320", "data.val.count=6"],
                           load_plugins().registry, "later", print)
    assert line["data"]["rows"] == [320, 326] and line["evaluation"] == "later"
    assert line["count"] == line["val_tokens"] - 1 and line["val_tokens"] != record(run_dir, "T-24")["val_tokens"]
    assert math.isclose(line["val_ppl"], math.exp(line["nll_sum"] / line["count"]), rel_tol=1e-12)


def test_evaluate_refuses_to_change_the_model_or_its_tokenizer(run_dir: Path, tmp_path: Path) -> None:
    registry = load_plugins().registry
    with pytest.raises(UserError, match="changes only data"):
        evaluate_run(run_dir, "T-24", "best", ["models.1.n_layer=2"], registry, None, print)
    other = make_gpt2_tokenizer_dir(tmp_path / "gpt2")
    with pytest.raises(UserError, match="a model is scored only with its own tokenizer"):
        evaluate_run(run_dir, "T-24", "best", ['tokenizer.name="gpt2"', f'tokenizer.path="{other}"',
                                                f"tokenizer.expect_vocab={FIXTURE_GPT2_VOCAB}"], registry, None, print)
    (same,) = evaluate_run(run_dir, "T-24", "best", ['tokenizer.name="bytes"'], registry, None, print)
    assert math.isclose(same["val_ppl"], record(run_dir, "T-24")["val_ppl"], rel_tol=1e-9)


@pytest.mark.slow
def test_sample_and_its_errors_on_the_command_line(run_dir: Path) -> None:
    result = kit("sample", str(run_dir), "--unit", "G-24", "--prompt", "The", "--tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert len(document["ids"]) == 5 and document["prompt_ids"] == list(b"The")
    several = kit("sample", str(run_dir), "--prompt", "The")
    assert several.returncode == 2 and "choose one with --unit" in several.stderr
    assert len(several.stderr.strip().splitlines()) == 1
    bad = kit("sample", str(run_dir), "--unit", "G-24", "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 2 and "--temperature" in bad.stderr


def test_keep_writes_what_keep_models_asks_and_never_a_best_model_that_is_not_one(tmp_path: Path) -> None:
    from newllm_kit_plugins.tokens.simple import BytesTokenizer

    from newllm_kit.config import load_config
    from newllm_kit.kept_models import KeptFiles, keep
    from newllm_kit.protocols import RecipeResult

    (tmp_path / "mixed.toml").write_text(MIXED)
    config = load_config(tmp_path / "mixed.toml", load_plugins().registry)
    model = config.models[2][1].build().build(256)
    run = RunDir.create(tmp_path / "runs", "mixed")
    files = KeptFiles(config, 2, "lm", BytesTokenizer(), {"model": "G", "samples": 24, "seed": 7})
    said: list[str] = []
    assert keep(run, "G-24", "none", model, RecipeResult(val=EvalOutputs()), files, said.append) == []
    assert not (run.path / "models").exists()
    last = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters() if name.startswith("rnn.")}
    result = RecipeResult(val=EvalOutputs(), final_weights=last)
    assert keep(run, "G-24", "both", model, result, files, said.append) == ["best", "final"]
    best, _ = read_weights(run.path / "models" / "G-24" / "best" / "model.safetensors")
    final, _ = read_weights(run.path / "models" / "G-24" / "final" / "model.safetensors")
    assert all(float(final[k].unique()) == 0.5 for k in last) and not any(torch.equal(best[k], final[k]) for k in last)
    not_restored = RecipeResult(val=EvalOutputs(), ends_on_best=False)
    assert keep(run, "G-25", "best", model, not_restored, files, said.append) == ["final"]
    assert said == ["G-25: the model ends on its last epoch's weights (nothing restored), not on the best epoch's "
                    "that the validation numbers are; kept as \"final\" only"]
    assert sorted(p.name for p in (run.path / "models").iterdir()) == ["G-24", "G-25"]
    assert [p.name for p in (run.path / "models" / "G-25").iterdir()] == ["final"]


def test_evaluate_runs_where_set_runner_says(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from newllm_kit_plugins.runners import local

    built: list[int] = []
    original = local.CPURunner.__init__

    def recording(self: Any, settings: Any = None) -> None:
        original(self, settings)
        built.append(self.settings.threads)

    monkeypatch.setattr(local.CPURunner, "__init__", recording)
    (line,) = evaluate_run(run_dir, "G-24", "best", ["runner.threads=2"], load_plugins().registry, "threads", print)
    assert built and built[-1] == 2
    assert math.isclose(line["val_ppl"], record(run_dir, "G-24")["val_ppl"], rel_tol=1e-9)
