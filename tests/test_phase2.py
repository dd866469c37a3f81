"""Phase 2: the chunked head loss, the epoch loop's stopping/restoring rules, micro-batching, OOM
retries, sharding over ranks, and bit-identical resume — on tiny float64 models on the CPU."""

from __future__ import annotations

import copy
import json
import math
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from newllm_kit_plugins.cvfp import phase2
from newllm_kit_plugins.cvfp.phase2 import (
    Phase2Data,
    Phase2Settings,
    evaluate,
    input_weights,
    store_rows,
    train_phase2,
)
from thread_ranks import BoardCollectives, run_ranks
from torch import nn

from newllm_kit.errors import RunFailed
from newllm_kit.protocols import EvalOutputs
from newllm_kit.training import TrainState as Phase2State
from newllm_kit.training import early_stop_update, head_cross_entropy

V, T, WIDTHS = 11, 5, (3, 4)
C = WIDTHS[-1]  # the context a position hands on is the last layer's output


class CPURunner:
    """The smallest `Runner`: one process on the CPU; `micro` caps the micro-batch (None: whole batch)."""

    name, precision, rank, world_size = "test-cpu", "fp32", 0, 1
    device = torch.device("cpu")

    def __init__(self, micro: int | None = None, recover: bool = True) -> None:
        self.micro, self.recover, self.ooms = micro, recover, 0

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def barrier(self) -> None: ...

    def autocast(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        return requested or 1

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def micro_batch(self, batch: int) -> int:
        return batch if self.micro is None else min(batch, self.micro)

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        self.ooms += 1
        self.micro = max(1, self.micro_batch(batch) // 2)
        return self.recover

    def shard(self, n: int) -> range:
        return range(n)

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        return last_row

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor


class Silent:
    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, phase: str, **fields: float) -> None: ...

    def finish(self, phase: str) -> None: ...

    def message(self, text: str) -> None: ...


class TinyBlock(nn.Module):
    """A two-layer ContextBlock: h_1 = tanh(A·c + P·x), h_2 = tanh(B·h_1); `project_tokens` is P·x."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.b = nn.Linear(C, WIDTHS[0], bias=False), nn.Linear(T, WIDTHS[0]), nn.Linear(*WIDTHS)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.p(tokens)

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        first = torch.tanh(self.a(context) + projected)
        return [first, torch.tanh(self.b(first))]


class TinyModel(nn.Module):
    """The Phase-2 surface of `protocols.Model`: a frozen embedding and ContextBlock (always the same),
    a one-layer TokenBlock and an untied head (drawn from `seed`)."""

    layer_widths, token_width = WIDTHS, T

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(V, T).requires_grad_(False)
        self.context_block = TinyBlock().requires_grad_(False)
        torch.manual_seed(seed)
        self.mix = nn.Linear(sum(WIDTHS) + T, 6)
        self.head = nn.Linear(6, V)
        self.double()
        self.oom_once_above: int | None = None  # raise one OutOfMemoryError for a larger micro-batch

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        if self.oom_once_above is not None and tokens.shape[0] > self.oom_once_above:
            self.oom_once_above = None
            raise torch.OutOfMemoryError("fake: out of memory")
        return torch.tanh(self.mix(torch.cat([*layer_contexts, tokens], dim=-1)))

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.weight, self.head.bias

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        phase2 = [*self.mix.parameters(), *self.head.parameters()]
        return {"phase1": list(self.context_block.parameters()), "phase2": phase2}


def make_data(n: int, seed: int) -> Phase2Data:
    g = torch.Generator().manual_seed(seed)
    contexts = torch.randn(n, C, generator=g, dtype=torch.float64)
    return Phase2Data(contexts, torch.randint(0, V, (n,), generator=g))


TRAIN, VAL = make_data(61, 1), make_data(23, 2)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run(model: TinyModel | None = None, runner: Any = None, **keys: Any) -> tuple[TinyModel, Any]:
    model = model or TinyModel()
    options: dict[str, Any] = {"batch_size": 16, "epochs": 3, "patience": 5, "learning_rate": 0.01, **keys}
    report = train_phase2(model, TRAIN, VAL, Phase2Settings(**options), runner or CPURunner(), Silent())
    return model, report


# -- the chunked loss -------------------------------------------------------------------------------

def reference(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(states, weight, bias)
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 30), chunk=st.integers(1, 50), with_bias=st.booleans(),
       train_head=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_cross_entropy_matches_full(rows: int, vocab: int, chunk: int, with_bias: bool,
                                            train_head: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 7, generator=g, dtype=torch.float64).requires_grad_(train_head)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_(train_head)
    bias = bias if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    inputs = [t for t in (states, weight, bias) if t is not None and t.requires_grad]

    loss, correct = head_cross_entropy(states, weight, bias, targets, chunk)
    grads = torch.autograd.grad(loss * 0.37, inputs)
    ref_loss, ref_correct = reference(states, weight, bias, targets)
    ref_grads = torch.autograd.grad(ref_loss * 0.37, inputs)

    assert loss.dtype == torch.float64 and int(correct) == int(ref_correct)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_hits_follow_argmax_when_logits_tie() -> None:
    g = torch.Generator().manual_seed(0)  # small integers: every matmul order gives the same, exact logits
    states = torch.randint(-3, 4, (40, 4), generator=g).float()
    targets = torch.randint(0, 6, (40,), generator=g)
    _, uniform = head_cross_entropy(states, torch.zeros(6, 4), torch.zeros(6), targets, chunk=7)
    assert int(uniform) == int((targets == 0).sum())  # every logit ties: argmax is token 0
    weight = torch.randint(-3, 4, (6, 4), generator=g).float()
    weight[4] = weight[1]  # tokens 1 and 4 always tie; argmax can only ever pick 1
    logits = states @ weight.T
    targets = torch.cat([logits.argmax(-1)[:20], torch.full((10,), 4), torch.full((10,), 1)])
    _, hits = head_cross_entropy(states, weight, None, targets, chunk=3)
    assert int(hits) == int((logits.argmax(-1) == targets).sum()) and int(hits) >= 20
    near = torch.tensor([[1e-3], [1e-3 - 2e-10], [5e-4]])  # distinct floats whose exp(z - max) rounds to 1
    assert near[0, 0] != near[1, 0]
    _, hit_first = head_cross_entropy(torch.ones(2, 1), near, None, torch.tensor([0, 1]))
    assert int(hit_first) == 1
    _, none = head_cross_entropy(states, weight, None, targets, count_correct=False)
    assert int(none) == 0


def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(64, 16, generator=g, requires_grad=True)
    weight, targets = torch.randn(100, 16, generator=g) * 0.2, torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head_cross_entropy(states, weight, None, targets, chunk=24)
    (grad,) = torch.autograd.grad(loss, states)
    ref_loss, _ = reference(states, weight, None, targets)
    (ref_grad,) = torch.autograd.grad(ref_loss, states)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=5e-2, atol=5e-2)


# -- early stopping ---------------------------------------------------------------------------------

def stop_epoch(losses: list[float], patience: int) -> tuple[int, int]:
    """(best epoch, epoch at which training stops) for a sequence of validation losses."""
    best, counter, best_epoch = math.inf, 0, 0
    for epoch, loss in enumerate(losses, start=1):
        best, counter, improved, stop = early_stop_update(best, counter, loss, patience)
        best_epoch = epoch if improved else best_epoch
        if stop:
            return best_epoch, epoch
    return best_epoch, len(losses)


@pytest.mark.parametrize(("losses", "patience", "expected"), [
    ([3.0, 2.0, 2.5, 1.9, 2.0, 2.1], 1, (2, 3)),
    ([3.0, 2.0, 2.5, 1.9, 2.0, 2.1], 2, (4, 6)),
    ([2.0, 2.0, 1.0], 1, (1, 2)),  # equal is not an improvement (strict <)
    ([5.0, 4.0, 3.0, 2.0], 1, (4, 4)),  # never stops early
    ([1.0, 1.5, 1.2, 1.1], 3, (1, 4)),
])
def test_early_stop_update(losses: list[float], patience: int, expected: tuple[int, int]) -> None:
    assert stop_epoch(losses, patience) == expected


def scripted_eval(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> None:
    """Replace validation by a script of losses (count 10, correct = epoch)."""
    calls = iter(enumerate(losses, start=1))

    def fake(model: Any, data: Phase2Data, settings: Phase2Settings, runner: Any) -> EvalOutputs:
        epoch, loss = next(calls)
        return EvalOutputs(nll_sum=loss * 10, correct=epoch, count=10)

    monkeypatch.setattr(phase2, "evaluate", fake)


@pytest.mark.parametrize("restore_best", [True, False])
def test_stops_with_patience_and_reports_the_best_epoch(monkeypatch: pytest.MonkeyPatch,
                                                        restore_best: bool) -> None:
    scripted_eval(monkeypatch, [3.0, 2.0, 2.5, 2.6, 1.0])
    states: list[Phase2State] = []
    model = TinyModel()
    report = train_phase2(model, TRAIN, VAL, Phase2Settings(batch_size=16, epochs=5, patience=2,
                                                            restore_best=restore_best),
                          CPURunner(), Silent(), on_epoch_end=states.append)
    assert (report.best_epoch, report.epochs_run, len(report.history)) == (2, 4, 4)
    assert report.val == EvalOutputs(nll_sum=20.0, correct=2, count=10)
    assert [round(h["val_loss"], 9) for h in report.history] == [3.0, 2.0, 2.5, 2.6]
    assert report.history[1]["val_ppl"] == pytest.approx(math.exp(2.0))
    kept = states[1].model if restore_best else states[3].model  # best epoch's weights, or the last's
    for name, value in model.named_parameters():
        if name in kept:
            assert torch.equal(value.detach(), kept[name]), name
    assert not torch.equal(states[1].model["head.weight"], states[3].model["head.weight"])


# -- the loop on real numbers -----------------------------------------------------------------------

def reference_training(model: TinyModel, epochs: int, learning_rate: float, batch: int) -> list[float]:
    """Phase 2 written out on its own: batches of `batch` positions in stream order, the mean NLL of a
    batch (position i reads contexts[i − 1], zeros for i = 0, and predicts ids[i + 1]), the gradient norm
    clipped to 1, one Adam step on the TokenBlock and head; each epoch's mean NLL before its steps."""
    params = [*model.mix.parameters(), *model.head.parameters()]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    n = TRAIN.ids.numel() - 1
    previous = torch.cat([TRAIN.contexts.new_zeros(1, C), TRAIN.contexts[:n - 1]])
    tokens = model.embedding(TRAIN.ids[:n])
    layers = model.context_block.step(previous, model.context_block.p(tokens))
    losses = []
    for _ in range(epochs):
        total = 0.0
        for lo in range(0, n, batch):
            rows = slice(lo, min(lo + batch, n))
            optimizer.zero_grad()
            states = model.token_states([h[rows] for h in layers], tokens[rows])
            loss = F.cross_entropy(model.head(states), TRAIN.ids[1:][rows], reduction="sum")
            (loss / states.shape[0]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / n)
    return losses


def test_training_matches_a_reference_loop_and_leaves_frozen_weights_alone() -> None:
    model = TinyModel()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("embedding", "context_block"))}
    _, report = run(model, epochs=4, learning_rate=0.05, restore_best=False)
    by_hand = TinyModel()
    expected = reference_training(by_hand, epochs=4, learning_rate=0.05, batch=16)
    losses = [h["train_loss"] for h in report.history]
    assert losses == pytest.approx(expected, rel=1e-10)
    for name, value in params_of(by_hand).items():
        torch.testing.assert_close(params_of(model)[name], value, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert report.history[0]["train_ppl"] == pytest.approx(math.exp(losses[0]))


def test_evaluate_sums_every_position_exactly() -> None:
    model = TinyModel()
    out = evaluate(model, VAL, Phase2Settings(batch_size=7, eval_batch_size=5), CPURunner(micro=2))
    with torch.no_grad():  # every position at once: position i reads contexts[i − 1], position 0 zeros
        tokens = model.token_inputs(VAL.ids[:-1])
        previous = torch.cat([VAL.contexts.new_zeros(1, C), VAL.contexts[:-2]])
        layers = model.context_block.step(previous, model.context_block.project_tokens(tokens))
        loss, correct = reference(model.token_states(layers, tokens), model.head.weight, model.head.bias,
                                  VAL.ids[1:])
    assert out.count == 22 and out.correct == int(correct)
    assert out.nll_sum == pytest.approx(float(loss), rel=1e-12)
    assert model.training


def test_micro_batches_give_the_full_batch_step() -> None:
    full, _ = run(runner=CPURunner(), epochs=2)
    pieces, _ = run(runner=CPURunner(micro=3), epochs=2)
    for name, value in params_of(full).items():
        torch.testing.assert_close(params_of(pieces)[name], value, rtol=1e-9, atol=1e-9)


def test_non_finite_loss_fails_naming_epoch_and_batch() -> None:
    bad = copy.deepcopy(TRAIN)
    bad.contexts[19, 1] = math.nan  # read by position 20, which lies in the second batch of 16
    with pytest.raises(RunFailed, match=r"phase 2, epoch 1, batch 2: non-finite loss"):
        train_phase2(TinyModel(), bad, VAL, Phase2Settings(batch_size=16), CPURunner(), Silent())


def test_out_of_memory_halves_the_micro_batch_and_retries_the_step() -> None:
    reference_model, reference_report = run()
    model = TinyModel()
    model.oom_once_above = 8
    runner = CPURunner()
    _, report = run(model, runner)
    assert runner.ooms == 1 and runner.micro == 8
    assert [h["val_loss"] for h in report.history] == pytest.approx(
        [h["val_loss"] for h in reference_report.history], rel=1e-9)
    for name, value in params_of(reference_model).items():
        torch.testing.assert_close(params_of(model)[name], value, rtol=1e-9, atol=1e-9)


def test_out_of_memory_is_re_raised_when_the_runner_gives_up() -> None:
    model = TinyModel()
    model.oom_once_above = 8
    with pytest.raises(torch.OutOfMemoryError):
        run(model, CPURunner(recover=False))


# -- resume -----------------------------------------------------------------------------------------

def without_seconds(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def through_a_checkpoint(state: Phase2State) -> Phase2State:
    """What a checkpoint does: tensors through safetensors, the rest through JSON."""
    tensors, data = state.to_checkpoint()
    return Phase2State.from_checkpoint(safetensors.torch.load(safetensors.torch.save(tensors)),
                                       json.loads(json.dumps(data)))


@pytest.mark.parametrize("restore_best", [True, False])
def test_resume_after_an_epoch_is_bit_identical(restore_best: bool) -> None:
    keys = {"epochs": 4, "patience": 2, "learning_rate": 0.3, "restore_best": restore_best}
    states: list[Phase2State] = []
    whole = TinyModel()
    report = train_phase2(whole, TRAIN, VAL, Phase2Settings(batch_size=16, **keys), CPURunner(), Silent(),
                          on_epoch_end=states.append)
    for k in range(len(states)):
        saved = through_a_checkpoint(states[k])
        resumed = TinyModel(seed=123)  # different initial weights: everything must come from the state
        again = train_phase2(resumed, TRAIN, VAL, Phase2Settings(batch_size=16, **keys), CPURunner(),
                             Silent(), start=saved)
        assert without_seconds(again.history) == without_seconds(report.history)
        assert (again.best_epoch, again.epochs_run) == (report.best_epoch, report.epochs_run)
        assert again.val == report.val
        for name, value in params_of(whole).items():
            if name.startswith(("mix", "head")):
                assert torch.equal(params_of(resumed)[name], value), (k, name)


# -- ranks ------------------------------------------------------------------------------------------

class ThreadRank(BoardCollectives, CPURunner):
    """One of `world` ranks run as threads (tests/thread_ranks.py)."""

    def __init__(self, rank: int, world: int, board: dict[str, Any]) -> None:
        super().__init__(micro=2)
        self.rank, self.world_size, self.board = rank, world, board


def test_ranks_in_lock_step_match_one_process() -> None:
    single, single_report = run(epochs=3)
    world = 3
    board: dict[str, Any] = {"barrier": threading.Barrier(world)}
    models = [TinyModel() for _ in range(world)]
    reports: list[Any] = [None] * world

    def rank(r: int) -> None:
        reports[r] = train_phase2(models[r], TRAIN, VAL, Phase2Settings(batch_size=16, epochs=3, patience=5,
                                                                        learning_rate=0.01),
                                  ThreadRank(r, world, board), Silent())

    run_ranks(world, rank)
    assert all(r is not None for r in reports)
    for r in range(world):
        assert reports[r].val.count == single_report.val.count
        assert reports[r].val.nll_sum == pytest.approx(single_report.val.nll_sum, rel=1e-9)
        for name, value in params_of(single).items():
            torch.testing.assert_close(params_of(models[r])[name], value, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_holding_only_the_rows_they_read_match_one_process(world: int) -> None:
    """Each rank's stores hold only its slices of the training batches and its shard of the validation
    positions (about 1/W of each stream); the training is the same as with whole stores."""
    single, single_report = run(epochs=3)
    shared: dict[str, Any] = {"barrier": threading.Barrier(world)}
    models = [TinyModel() for _ in range(world)]
    reports: list[Any] = [None] * world
    held: list[int] = [0] * world

    def only_mine(data: Phase2Data, batch: int | None, runner: Any) -> Phase2Data:
        where = store_rows(data.ids.numel(), batch, runner)
        rows = torch.cat([data.contexts[a:b] for a, b in where.spans])
        return Phase2Data(rows, data.ids, rows=where)

    def rank(r: int) -> None:
        runner = ThreadRank(r, world, shared)
        train, val = only_mine(TRAIN, 16, runner), only_mine(VAL, None, runner)
        held[r] = train.contexts.shape[0] + val.contexts.shape[0]
        reports[r] = train_phase2(models[r], train, val, Phase2Settings(batch_size=16, epochs=3, patience=5,
                                                                        learning_rate=0.01), runner, Silent())

    run_ranks(world, rank)
    assert sum(held) == TRAIN.contexts.shape[0] + VAL.contexts.shape[0]  # every row once, over the ranks
    for r in range(world):
        assert reports[r].val.count == single_report.val.count
        assert reports[r].val.nll_sum == pytest.approx(single_report.val.nll_sum, rel=1e-9)
        for name, value in params_of(single).items():
            torch.testing.assert_close(params_of(models[r])[name], value, rtol=1e-9, atol=1e-9)


# -- the real architecture --------------------------------------------------------------------------

@pytest.mark.parametrize("tie_head", [True, False])
def test_cvfp_model_trains_its_phase2_group(tie_head: bool) -> None:
    from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings

    torch.manual_seed(0)
    keys = {"layers": 2, "context_dim": 16, "embedding_dim": 8, "tie_head": tie_head}
    model = CVFPArchitecture(CVFPSettings(**keys)).build(50)
    model.double()
    model.set_embedding(torch.randn(50, 8, dtype=torch.float64), freeze=True)
    for p in model.param_groups()["phase1"]:
        p.requires_grad_(False)

    def stream(n: int, seed: int) -> Phase2Data:
        g = torch.Generator().manual_seed(seed)
        return Phase2Data(torch.randn(n, 16, generator=g, dtype=torch.float64),
                          torch.randint(0, 50, (n,), generator=g))

    before = params_of(model)
    options = Phase2Settings(batch_size=32, epochs=3, patience=3, learning_rate=0.01, ce_chunk=7)
    val = stream(40, 2)
    report = train_phase2(model, stream(200, 1), val, options, CPURunner(), Silent())
    after = params_of(model)
    # the model handed back is the one whose validation the report gives (the best epoch's weights)
    assert evaluate(model, val, options, CPURunner()) == report.val
    assert report.history[report.best_epoch - 1]["val_loss"] == report.val.nll_sum / report.val.count
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("token_block") for name in changed)
    assert ("head.weight" in changed) is (not tie_head)
    assert not any(name.startswith(("context_block", "embedding")) for name in changed)


# -- per-layer contexts recomputed from one context per position -----------------------------------

CPU = torch.device("cpu")


def cvfp(variant: str, num_input_tokens: int, freeze: bool = True) -> Any:
    """A small real model whose Phase-1 weights are frozen, as Phase 2 gets it."""
    from newllm_kit_plugins.cvfp.model import CVFPArchitecture, CVFPSettings

    torch.manual_seed(0)
    settings = CVFPSettings(layers=3, context_dim=12, embedding_dim=8, variant=variant,
                            num_input_tokens=num_input_tokens)
    model = CVFPArchitecture(settings).build(30)
    model.set_embedding(torch.randn(30, 8), freeze=freeze)
    for p in model.param_groups()["phase1"]:
        p.requires_grad_(False)
    return model


def rollout(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer at every position from the batch-1 sequential loop from a zero context (spec §4.2)."""
    with torch.no_grad():
        tokens = model.token_inputs(ids)
        context, rows = tokens.new_zeros(1, model.context_dim), []
        for i in range(len(ids)):
            rows.append(model.context_block(context, tokens[i:i + 1]))
            context = rows[-1][-1]
    return [torch.cat(layer) for layer in zip(*rows, strict=True)]


SPANS = [range(0, 1), range(0, 9), range(1, 2), range(7, 20), range(33, 39)]  # the stream start included


@pytest.mark.parametrize("variant", ["gradual-reduction", "token-every-layer"])
@pytest.mark.parametrize("num_input_tokens", [1, 2])
def test_a_batch_recomputes_every_layer_of_the_rollout_from_the_final_layer(variant: str,
                                                                            num_input_tokens: int) -> None:
    model = cvfp(variant, num_input_tokens)
    ids = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(1))
    want = rollout(model, ids)
    data = Phase2Data(want[-1].clone(), ids)
    with torch.no_grad():
        all_tokens = model.token_inputs(ids)
    for rows in SPANS:
        layers, tokens, targets = data.batch(model, rows, CPU)
        assert [h.shape[1] for h in layers] == list(model.layer_widths)
        for got, expected in zip(layers, want, strict=True):
            torch.testing.assert_close(got, expected[rows.start:rows.stop], rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens, all_tokens[rows.start:rows.stop], rtol=0, atol=1e-6)
        assert torch.equal(targets, ids[rows.start + 1:rows.stop + 1])
        assert not any(h.requires_grad for h in layers)


def test_a_bf16_store_gives_the_rollout_to_bf16_precision() -> None:
    model = cvfp("gradual-reduction", 1)
    ids = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(2))
    want = rollout(model, ids)
    layers, _, _ = Phase2Data(want[-1].to(torch.bfloat16), ids).batch(model, range(0, 39), CPU)
    assert all(h.dtype == torch.float32 for h in layers)
    for got, expected in zip(layers, want, strict=True):
        torch.testing.assert_close(got, expected[:39], rtol=0, atol=5e-2)


def test_token_inputs_keep_the_table_the_contexts_were_solved_with() -> None:
    """A tied, unfrozen table learns as the head in Phase 2; the batches still read its solved values."""
    ids = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(3))
    assert input_weights(cvfp("gradual-reduction", 1), ids) == {}  # frozen table: nothing to keep
    model = cvfp("gradual-reduction", 2, freeze=False)
    want = rollout(model, ids)
    with torch.no_grad():
        solved_tokens = model.token_inputs(ids)
    kept = input_weights(model, ids)
    assert list(kept) == ["embedding.weight"]
    with torch.no_grad():
        model.embedding.weight.add_(0.5)  # what Phase 2's steps do to the table
    trained = model.embedding.weight.detach().clone()
    layers, tokens, _ = Phase2Data(want[-1], ids, kept).batch(model, range(0, 39), CPU)
    for got, expected in zip(layers, want, strict=True):
        torch.testing.assert_close(got, expected[:39], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, solved_tokens[:39], rtol=0, atol=1e-6)
    assert torch.equal(model.embedding.weight, trained)  # the live table is back in place


def test_auto_batch_asks_the_runner_with_the_per_position_cost() -> None:
    asked: list[tuple[int | None, int]] = []

    class SizingRunner(CPURunner):
        def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
            asked.append((requested, bytes_per_item))
            return 24 if requested is None else requested

    report = train_phase2(TinyModel(), TRAIN, VAL, Phase2Settings(batch_size="auto", epochs=1), SizingRunner(),
                          Silent())
    assert asked[0] == (None, 4 * 5 * (sum(WIDTHS) + T)) and report.batch_size == 24
    fixed = train_phase2(TinyModel(), TRAIN, VAL, Phase2Settings(batch_size=16, epochs=1), SizingRunner(), Silent())
    assert fixed.batch_size == 16 and asked[-1][0] == 16  # a number in the file is used as it is
