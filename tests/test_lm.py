"""The lm recipe and its baselines: every validation position scored once, training, resume, presets."""

from __future__ import annotations

import copy
import itertools
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from newllm_kit_plugins.lm import AutoregressiveModel, gru, transformer
from newllm_kit_plugins.lm import recipe as lm
from newllm_kit_plugins.lm.gru import GRUArchitecture, GRUSettings
from newllm_kit_plugins.lm.recipe import LMRecipe, LMRecipeSettings, LMSettings, evaluate
from newllm_kit_plugins.lm.transformer import TransformerArchitecture, TransformerSettings
from newllm_kit_plugins.runners.local import CPURunner
from pydantic import ValidationError
from thread_ranks import BoardCollectives, run_ranks
from torch import nn

from newllm_kit.errors import ConfigError
from newllm_kit.protocols import LanguageModel, Saved, UnitContext, UnitData, missing_members

VOCAB = 50
CVFP_V2_TRAINABLE = {"v2-A": 23_960_576, "v2-B": 26_636_032}  # 6L-768 and 3L-1536, gradual reduction, frozen table
TRANSFORMER_TRAINABLE = {"v2-A": 23_960_538, "v2-B": 26_634_918}
GRU_TRAINABLE = {"v2-A": 23_964_741, "v2-B": 26_643_645}


class Progress:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.rows: list[dict[str, float]] = []

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None:
        self.rows.append(fields)

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None:
        self.messages.append(text)


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was published."""


class MemoryCheckpoint:
    """The Checkpointer protocol in memory; JSON state goes through json as the run directory's does."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.saved: Saved | None = None
        self.saves = 0
        self.kill_after = kill_after

    def load(self, check: Callable[[Saved], None] | None = None) -> Saved | None:
        if self.saved is not None and check is not None:
            try:
                check(self.saved)
            except (KeyError, TypeError, ValueError):
                return None
        return self.saved

    def save(self, stage: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        copied = {group: {k: v.detach().clone() for k, v in named.items()} for group, named in tensors.items()}
        self.saved = Saved(stage, copied, json.loads(json.dumps(state)))
        self.saves += 1
        if self.saves == self.kill_after:
            raise Killed

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k not in frozen}

    def file(self, name: str) -> Path:
        raise NotImplementedError

    def write_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        raise NotImplementedError

    def append(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        self.saved = None


def pattern_stream(n: int, period: int = 23, seed: int = 0, phase: int = 0) -> torch.Tensor:
    """A fixed permutation of `period` tokens, repeated: the next token follows from the current one."""
    cycle = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:period]
    return cycle[(torch.arange(n) + phase) % period]


def unit_for(tmp_path: Path, seed: int = 0, checkpoint: MemoryCheckpoint | None = None) -> UnitContext:
    return UnitContext(id="T-1", seed=seed, runner=CPURunner(), progress=Progress(),
                       checkpoint=checkpoint or MemoryCheckpoint(), scratch=tmp_path, metrics=lambda outputs: {})


def data_for(train: torch.Tensor, val: torch.Tensor) -> UnitData:
    documents = np.array([[0, train.numel()]], dtype=np.int64)
    return UnitData(train_ids=train, val_ids=val, train_documents=documents, vocab_size=VOCAB)


def tiny_transformer(seed: int = 0, frozen: bool = True, **keys: Any) -> transformer.TransformerModel:
    torch.manual_seed(seed)
    options = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8, **keys}
    model = TransformerArchitecture(TransformerSettings(**options)).build(VOCAB)
    model.set_embedding(torch.randn(VOCAB, 16) * 0.5, freeze=frozen)
    return model


def tiny_gru(seed: int = 0, **keys: Any) -> gru.GRUModel:
    torch.manual_seed(seed)
    model = GRUArchitecture(GRUSettings(**{"embedding_dim": 16, "hidden_size": 24, "layers": 2, **keys})).build(VOCAB)
    model.set_embedding(torch.randn(VOCAB, 16) * 0.5, freeze=True)
    return model


def recipe(**keys: Any) -> LMRecipe:
    return LMRecipe(LMRecipeSettings(lm=LMSettings(**{"warmup_steps": 2, "batch_size": 4, **keys})))


class OneWindowRunner(CPURunner):
    """A runner after out-of-memory fallbacks down to a micro-batch of one window."""

    def micro_batch(self, batch: int) -> int:
        return 1


@pytest.mark.parametrize(("positions", "block", "stride"), [(1, 8, 3), (7, 8, 3), (8, 8, 3), (30, 8, 3),
                                                             (31, 8, 8), (40, 8, 1), (23, 5, 4)])
def test_eval_windows_score_every_position_once_with_enough_context(positions: int, block: int, stride: int) -> None:
    scored: list[int] = []
    for w in lm.eval_windows(positions, block, stride):
        assert 0 <= w.start and w.start + w.length <= positions and w.length == min(block, positions)
        for offset in range(w.skip, w.length):
            target = w.start + offset + 1
            context = target - w.start
            assert context >= min(block - stride + 1, target)  # the first window's positions see all there is
            scored.append(target)
    assert scored == list(range(1, positions + 1))


def test_sliding_evaluation_equals_per_position_brute_force() -> None:
    model, block, stride = tiny_transformer().double().eval(), 8, 3  # float64: sums agree to far below 1e-5
    ids = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(1))
    out = evaluate(model, ids, CPURunner(), window=8, stride=stride, tokens=16, ce_chunk=7)

    positions, reference = ids.numel() - 1, 0.0
    with torch.no_grad():
        for target in range(1, positions + 1):
            end = min(block, positions)  # the end (in targets) of the window that scores `target`
            while end < target:
                end = min(end + stride, positions)
            start = end - min(block, positions)
            logits = model(ids[None, start:target])[0, -1]
            reference += float(F.cross_entropy(logits[None], ids[target:target + 1], reduction="sum"))
    assert out.count == positions
    assert out.nll_sum == pytest.approx(reference, abs=1e-5)
    one_at_a_time = evaluate(model, ids, OneWindowRunner(), window=8, stride=stride, tokens=16, ce_chunk=7)
    assert one_at_a_time.nll_sum == pytest.approx(out.nll_sum, abs=1e-9) and one_at_a_time.correct == out.correct
    assert out.extras["contexts"].shape == (positions, 16) and out.extras["context_width"] == 16


def test_recurrent_evaluation_carries_state_across_segments() -> None:
    model = tiny_gru().double().eval()
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(2))
    out = evaluate(model, ids, CPURunner(), window=7, stride=None, tokens=1, ce_chunk=5)
    with torch.no_grad():
        states, _ = model.hidden(ids[None, :-1])
        whole = F.cross_entropy(F.linear(states[0], model.embedding.weight), ids[1:], reduction="sum")
    assert out.count == ids.numel() - 1
    assert out.nll_sum == pytest.approx(float(whole), abs=1e-5)
    assert torch.allclose(out.extras["contexts"], states[0].float(), atol=1e-6)


def test_context_sample_is_capped_and_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "MAX_CONTEXT_ROWS", 10)
    out = evaluate(tiny_transformer(), torch.arange(40) % VOCAB, CPURunner(), window=8, stride=4, tokens=64,
                   ce_chunk=64)
    assert out.extras["contexts"].shape == (10, 16)
    assert not (out.extras["contexts"] == 0).all(dim=1).any()  # every kept row was filled


@pytest.mark.parametrize("build", [tiny_transformer, tiny_gru])
def test_training_learns_a_pattern_below_the_unigram_entropy(tmp_path: Path, build: Callable[..., nn.Module]
                                                             ) -> None:
    model = build()
    data = data_for(pattern_stream(400), pattern_stream(120, phase=5))
    unit = unit_for(tmp_path)
    result = recipe(epochs=8, learning_rate=1e-2, window=8, patience=8).train(model, data, unit)
    val_loss = result.val.nll_sum / result.val.count
    assert result.val.count == 119
    assert val_loss < 0.5 * math.log(23)  # every token of the period is equally likely: unigram entropy ln 23
    assert result.record["best_epoch"] == min(range(8), key=lambda e: result.record["history"][e]["val_loss"]) + 1
    assert result.record["steps"] == 8 * math.ceil(50 / 4)  # 399 predictions in windows of 8, 4 per step
    assert any("training windows" in m for m in unit.progress.messages)  # type: ignore[attr-defined]
    json.dumps(result.record)


def test_early_stopping_ends_on_the_best_weights(tmp_path: Path) -> None:
    model = tiny_transformer()  # trained on a pattern, scored on noise: validation gets worse soon
    noise = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(3))
    result = recipe(epochs=20, learning_rate=1e-2, patience=2).train(
        model, data_for(pattern_stream(300), noise), unit_for(tmp_path))
    record = result.record
    assert record["epochs_run"] == record["best_epoch"] + 2 < 20
    again = evaluate(model, noise, CPURunner(), window=8, stride=None, tokens=32, ce_chunk=2048)
    assert again.nll_sum == pytest.approx(result.val.nll_sum, rel=1e-6)


def killed_and_resumed(build: Callable[..., nn.Module], settings: dict[str, Any], data: UnitData, tmp_path: Path
                       ) -> tuple[nn.Module, Any, nn.Module, Any, MemoryCheckpoint]:
    """The same unit (seed 4, dropout 0.1) trained whole, and killed after its second checkpoint then
    resumed on a model the core rebuilds with the unit's seed: each model and result, and the checkpoint."""
    whole_model = build(seed=4, dropout=0.1)
    whole = recipe(**settings).train(whole_model, data, unit_for(tmp_path, seed=4))
    checkpoint = MemoryCheckpoint(kill_after=2)
    with pytest.raises(Killed):
        recipe(**settings).train(build(seed=4, dropout=0.1), data, unit_for(tmp_path, 4, checkpoint))
    checkpoint.kill_after = None
    resumed_model = build(seed=4, dropout=0.1)
    resumed = recipe(**settings).train(resumed_model, data, unit_for(tmp_path, 4, checkpoint))
    return whole_model, whole, resumed_model, resumed, checkpoint


def test_resume_after_a_kill_is_bit_identical(tmp_path: Path) -> None:
    data = data_for(pattern_stream(300), pattern_stream(60, phase=3))
    settings = {"epochs": 3, "patience": 10, "order": "shuffled", "learning_rate": 5e-3}

    whole_model, whole, resumed_model, resumed, _ = killed_and_resumed(tiny_transformer, settings, data, tmp_path)

    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    def without_seconds(record: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in record.items() if k != "seconds"},
                "history": [{k: v for k, v in row.items() if k != "seconds"} for row in record["history"]]}

    assert without_seconds(resumed.record) == without_seconds(whole.record)
    assert resumed.val.nll_sum == whole.val.nll_sum
    assert torch.equal(resumed.val.extras["contexts"], whole.val.extras["contexts"])


def test_a_checkpoint_of_another_model_is_ignored(tmp_path: Path) -> None:
    data = data_for(pattern_stream(100), pattern_stream(30))
    checkpoint = MemoryCheckpoint()
    recipe(epochs=1).train(tiny_transformer(), data, unit_for(tmp_path, checkpoint=checkpoint))
    settings = recipe(epochs=1).settings

    def fits(model: nn.Module, window: int) -> Callable[[Saved], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        return lm._checkpoint_fits(model, params, lm._optimizer(model, params, settings), window, settings,
                                   carried=False)

    assert checkpoint.load(fits(tiny_transformer(), window=8)) is not None
    assert checkpoint.load(fits(tiny_transformer(n_layer=3), window=8)) is None
    assert checkpoint.load(fits(tiny_transformer(), window=4)) is None


class ThreadRank(BoardCollectives, CPURunner):
    """One of `world` ranks run as threads (tests/thread_ranks.py)."""

    def __init__(self, rank: int, world: int, board: dict[Any, Any]) -> None:
        super().__init__()
        self.rank, self.world_size, self.board = rank, world, board


@pytest.mark.parametrize("build", [tiny_transformer, tiny_gru])
def test_ranks_in_lock_step_match_one_process(tmp_path: Path, build: Callable[..., nn.Module]) -> None:
    data = data_for(pattern_stream(200), pattern_stream(45, phase=2))
    settings = {"epochs": 2, "patience": 5, "batch_size": 5, "window": 8}
    single = build().double()
    expected = recipe(**settings).train(single, data, unit_for(tmp_path))
    world, board = 2, {"barrier": threading.Barrier(2)}
    models = [build().double() for _ in range(world)]
    results: list[Any] = [None] * world

    def rank(r: int) -> None:
        unit = unit_for(tmp_path)
        unit.runner = ThreadRank(r, world, board)
        results[r] = recipe(**settings).train(models[r], data, unit)

    run_ranks(world, rank)
    for r in range(world):
        assert results[r].val.count == expected.val.count == 44
        assert results[r].val.nll_sum == pytest.approx(expected.val.nll_sum, rel=1e-9)
        torch.testing.assert_close(results[r].val.extras["contexts"], expected.val.extras["contexts"])
        for (name, a), (_, b) in zip(single.state_dict().items(), models[r].state_dict().items(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize(("positions", "lanes", "window"), [(1, 4, 8), (9, 4, 2), (10, 3, 1), (50, 7, 3),
                                                            (100, 3, 8), (199, 5, 8)])
def test_lanes_train_every_position_once_in_stream_order(positions: int, lanes: int, window: int) -> None:
    steps = lm.lane_windows(positions, lanes, window)
    count = len(steps[0])
    assert 1 <= count <= lanes and all(len(step) == count for step in steps)
    trained: list[int] = []
    for lane in range(count):
        run = [step[lane] for step in steps]
        assert all(0 <= w.length <= window for w in run)
        for before, after in itertools.pairwise(run):  # each window continues its lane's previous one
            assert after.start == before.start + before.length or after.length == 0
        trained += [p for w in run for p in range(w.start + 1, w.start + w.length + 1)]
    assert trained == list(range(1, positions + 1))  # lane after lane, each in stream order: every position once


class RecordingGRU(gru.GRUModel):
    """A GRU that keeps the ids, the state passed in and the state returned of every training call."""

    def __init__(self, cfg: GRUSettings, vocab_size: int) -> None:
        super().__init__(cfg, vocab_size)
        self.calls: list[tuple[torch.Tensor, Any, torch.Tensor]] = []

    def hidden(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, new = super().hidden(ids, state)
        if self.training:
            self.calls.append((ids, state, new))
        return out, new


def recording_gru() -> RecordingGRU:
    torch.manual_seed(0)
    model = RecordingGRU(GRUSettings(embedding_dim=16, hidden_size=24, layers=2), VOCAB)
    model.set_embedding(torch.randn(VOCAB, 16) * 0.5, freeze=True)
    return model


def test_a_recurrent_state_is_carried_across_windows_and_emptied_each_epoch(tmp_path: Path) -> None:
    train, data = pattern_stream(101), data_for(pattern_stream(101), pattern_stream(30))
    model = recording_gru()
    recipe(epochs=2, patience=5, window=8, batch_size=3).train(model, data, unit_for(tmp_path))
    steps = lm.lane_windows(100, 3, 8)  # lanes of 34, 34 and 32 predictions: the last one padded at the end
    assert len(steps) == 5 and len(model.calls) == 2 * len(steps)
    for k, (ids, state, _) in enumerate(model.calls):
        for row, w in zip(ids, steps[k % len(steps)], strict=True):  # window k of every lane, in lane order
            assert torch.equal(row[:w.length], train[w.start:w.start + w.length])
        if k % len(steps) == 0:
            assert state is None  # an epoch starts where the stream starts
        else:  # the previous window's final state, cut from its graph
            assert torch.equal(state, model.calls[k - 1][2]) and not state.requires_grad

    reset = recording_gru()
    recipe(epochs=1, window=8, batch_size=3, state="reset").train(reset, data, unit_for(tmp_path))
    assert sum(len(ids) for ids, _, _ in reset.calls) == 13  # independent windows, each from an empty state
    assert all(state is None for _, state, _ in reset.calls)


def test_a_carried_state_is_kept_per_micro_batch_of_lanes(tmp_path: Path) -> None:
    data = data_for(pattern_stream(150), pattern_stream(40, phase=2))
    whole, one_lane_at_a_time = tiny_gru().double(), tiny_gru().double()
    recipe(epochs=2, window=8, batch_size=4).train(whole, data, unit_for(tmp_path))
    unit = unit_for(tmp_path)
    unit.runner = OneWindowRunner()
    recipe(epochs=2, window=8, batch_size=4).train(one_lane_at_a_time, data, unit)
    for (name, a), (_, b) in zip(whole.state_dict().items(), one_lane_at_a_time.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


def test_a_carried_state_resumes_bit_identically(tmp_path: Path) -> None:
    data = data_for(pattern_stream(160), pattern_stream(40, phase=3))
    settings = {"epochs": 3, "patience": 10, "window": 8, "learning_rate": 5e-3}
    whole_model, whole, resumed_model, resumed, checkpoint = killed_and_resumed(tiny_gru, settings, data, tmp_path)

    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    drop = "seconds"
    assert [{k: v for k, v in row.items() if k != drop} for row in resumed.record["history"]] == \
        [{k: v for k, v in row.items() if k != drop} for row in whole.record["history"]]
    assert resumed.val.nll_sum == whole.val.nll_sum

    params = [p for p in resumed_model.parameters() if p.requires_grad]
    s = recipe(**settings).settings
    fits = lm._checkpoint_fits(resumed_model, params, lm._optimizer(resumed_model, params, s), 8, s, carried=False)
    assert checkpoint.load(fits) is None  # trained with a carried state: not a checkpoint of independent windows


def test_a_carried_state_refuses_shuffled_windows_in_one_line(tmp_path: Path) -> None:
    data = data_for(pattern_stream(60), pattern_stream(30))
    with pytest.raises(ConfigError, match=r'^lm.order = "shuffled" would break the state lm.state = "carried" '
                                          r'carries .*; leave lm.order out, or set lm.state = "reset"$') as error:
        recipe(order="shuffled").train(tiny_gru(), data, unit_for(tmp_path))
    assert "\n" not in str(error.value)
    recipe(epochs=1, order="shuffled", state="reset").train(tiny_gru(), data, unit_for(tmp_path))
    recipe(epochs=1, order="shuffled").train(tiny_transformer(), data, unit_for(tmp_path))  # no state to carry


@pytest.mark.parametrize(("build", "counts"), [(TransformerArchitecture, TRANSFORMER_TRAINABLE),
                                                (GRUArchitecture, GRU_TRAINABLE)])
@pytest.mark.parametrize("preset", ["v2-A", "v2-B"])
def test_presets_match_cvfp_v2_trainable_parameters(build: Any, counts: dict[str, int], preset: str) -> None:
    settings = TransformerSettings(preset=preset) if build is TransformerArchitecture else GRUSettings(preset=preset)
    with torch.device("meta"):
        model = build(settings).build(50257)
        model.set_embedding(torch.empty(50257, 768), freeze=True)
    trainable = sum(p.numel() for p in model.param_groups()["train"])
    assert trainable == counts[preset]
    assert abs(trainable - CVFP_V2_TRAINABLE[preset]) / CVFP_V2_TRAINABLE[preset] < 3e-4  # within 0.03 %
    assert model.param_counts()["total"] == trainable + 50257 * 768


def test_cvfp_v2_counts_are_the_ones_matched() -> None:
    from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings

    for preset, cvfp_preset in (("v2-A", "6L-768"), ("v2-B", "3L-1536")):
        with torch.device("meta"):
            model = CVFPArchitecture(CVFPSettings(preset=cvfp_preset, variant="gradual-reduction")).build(50257)
            model.set_embedding(torch.empty(50257, 768), freeze=True)
        groups = model.param_groups()
        assert sum(p.numel() for p in groups["phase1"] + groups["phase2"]) == CVFP_V2_TRAINABLE[preset]


@pytest.mark.parametrize("build", [tiny_transformer, tiny_gru])
def test_models_satisfy_the_protocols_and_group_the_table_by_freeze(build: Callable[..., Any]) -> None:
    model = build()
    assert missing_members(model, LanguageModel) == []
    assert missing_members(model, AutoregressiveModel) == []
    assert all(id(p) != id(model.embedding.weight) for p in model.param_groups()["train"])
    model.set_embedding(model.embedding.weight.detach().clone(), freeze=False)
    assert any(p is model.embedding.weight for p in model.param_groups()["train"])
    assert model.param_counts()["head"] == 0 and model.output_head()[0] is model.embedding.weight


def test_transformer_heads_must_divide_the_width() -> None:
    with pytest.raises(ValidationError, match="n_embd 30 is not divisible by n_head 4"):
        TransformerSettings(n_embd=30, n_head=4)


def test_recipe_settings_are_one_lm_table_and_refuse_unknown_keys() -> None:
    assert LMRecipeSettings.model_validate({"lm": {"epochs": 3}}).lm.epochs == 3
    with pytest.raises(ValidationError):
        LMRecipeSettings.model_validate({"lm": {"epoch": 3}})
    with pytest.raises(ValidationError):
        LMRecipeSettings.model_validate({"phase2": {}})


def test_a_window_longer_than_the_block_is_refused(tmp_path: Path) -> None:
    data = data_for(pattern_stream(100), pattern_stream(30))
    with pytest.raises(ConfigError, match=r"lm.window = 9 .* block_size 8"):
        recipe(window=9).train(tiny_transformer(), data, unit_for(tmp_path))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    settings = LMSettings(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    rates = [lm.learning_rate_at(step, 20, settings) for step in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    # then half a cosine from 1.0 down to the floor 0.1, over the 16 steps after the warm-up
    assert rates[4:] == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi * k / 16)) for k in range(16)], rel=1e-12)
    assert lm.learning_rate_at(20, 20, settings) == pytest.approx(0.1)
    assert lm.warmup_steps(400, LMSettings()) == 20  # unset: 5 % of the run's steps


def test_plugins_register_their_components() -> None:
    seen: dict[str, Any] = {}

    def register(name: str, factory: Any, *, settings: Any = None, description: str = "") -> None:
        seen[name] = (factory, settings)

    lm.register_recipes(register)
    transformer.register_architectures(register)
    gru.register_architectures(register)
    assert seen == {"lm": (LMRecipe, LMRecipeSettings), "transformer": (TransformerArchitecture, TransformerSettings),
                    "gru": (GRUArchitecture, GRUSettings)}
    assert TransformerArchitecture().default_recipe == GRUArchitecture().default_recipe == "lm"
    assert copy.deepcopy(LMRecipe(None).settings) == LMSettings()
