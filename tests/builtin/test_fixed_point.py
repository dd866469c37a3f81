"""The Phase-1 solver `cvfp`: Phase 1 of spec §3 (by hand and against a naive re-implementation), the stop
rule, non-finite handling, determinism, and every frozen-solve method against float64 rollouts."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from newllm_kit_plugins.cvfp import frozen_solve, jacobi_pass
from newllm_kit_plugins.cvfp import phase1 as fixed_point
from newllm_kit_plugins.cvfp.phase1 import CVFPPhase1Settings, CVFPPhase1Solver
from newllm_kit_plugins.cvfp.row_map import RowMap, batch_rows
from newllm_kit_plugins.cvfp.spans import token_rows, token_span
from newllm_kit_plugins.runners.ddp import contiguous_shard
from pydantic import ValidationError
from torch import nn
from torch.func import jvp

from newllm_kit.errors import RunFailed, UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny tensors: a second OpenMP thread only adds synchronisation (and suffers most on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class CPURunner:
    """The Runner protocol on one CPU process: every collective is the identity."""

    name, device, precision, rank, world_size = "test-cpu", torch.device("cpu"), "fp32", 0, 1

    def __init__(self, micro: int | None = None) -> None:
        self.micro = micro

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def barrier(self) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def batch_size(self, requested: int | None, bytes_per_item: int) -> int:
        return requested or 512

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def micro_batch(self, batch: int) -> int:
        return batch if self.micro is None else min(batch, self.micro)

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        return False

    def shard(self, n: int) -> range:
        return range(n)

    def neighbour_exchange(self, last_row: torch.Tensor) -> torch.Tensor:
        return last_row

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor


class RecordingProgress:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, float]]] = []
        self.messages: list[str] = []

    def start(self, phase: str, total: int | None) -> None:
        self.events.append(("start", phase, {"total": float(total or 0)}))

    def advance(self, phase: str, **fields: float) -> None:
        self.events.append(("advance", phase, fields))

    def finish(self, phase: str) -> None:
        self.events.append(("finish", phase, {}))

    def message(self, text: str) -> None:
        self.messages.append(text)


class TinyBlock(nn.Module):
    """A Variant-B-shaped ContextBlock: layer 1 reads [c; x], later layers only h_{j−1}.

    `damp` scales the context path; with LayerNorm everywhere it sets the contraction gain
    (≈0.2 at 0.2, ≈0.5 at 0.5, > 1 at 2 for these widths).
    """

    def __init__(self, context_dim: int = 4, token_dim: int = 3, widths: tuple[int, ...] = (6, 5, 4),
                 damp: float = 0.5) -> None:
        super().__init__()
        self.token = nn.Linear(token_dim, widths[0])
        self.context = nn.Linear(context_dim, widths[0], bias=False)
        self.carry = nn.Linear(context_dim, widths[0], bias=False)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.carries = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in widths)
        with torch.no_grad():
            self.context.weight.mul_(damp)
            self.carry.weight.mul_(damp)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token(tokens)

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        h = self.norms[0](self.carry(context) + F.relu(self.context(context) + projected))
        out = [h]
        for linear, carry, norm in zip(self.layers, self.carries, self.norms[1:], strict=True):
            h = norm(carry(h) + F.relu(linear(h)))
            out.append(h)
        return out


class LinearBlock(nn.Module):
    """F(c, x) = a·R c + x with a learnable scalar a: small enough to check by hand."""

    def __init__(self, width: int = 2, a: float = 0.5, rotation: torch.Tensor | None = None) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.register_buffer("rotation", torch.eye(width) if rotation is None else rotation)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        return [self.a * context @ self.rotation.T + projected]


class TinyModel(nn.Module):
    """Just the Model members a solver reads; token i of the table is the input of id i."""

    def __init__(self, block: nn.Module, context_dim: int, table: torch.Tensor) -> None:
        super().__init__()
        self.context_block = block
        self.context_dim = context_dim
        self.register_buffer("table", table)

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": list(self.context_block.parameters()), "phase2": []}


def tiny(n: int = 48, seed: int = 0, **block: Any) -> tuple[TinyModel, torch.Tensor]:
    """A TinyBlock model over n random token inputs; the stream's ids are 0 … n − 1."""
    torch.manual_seed(seed)
    tiny_block = TinyBlock(**block)
    return TinyModel(tiny_block, block.get("context_dim", 4), torch.randn(n, 3)), torch.arange(n)


def linear(x: torch.Tensor, **block: Any) -> tuple[TinyModel, torch.Tensor]:
    """A LinearBlock model whose stream's token inputs are the rows of x."""
    return TinyModel(LinearBlock(x.shape[1], **block), x.shape[1], x), torch.arange(x.shape[0])


def fit(model: Any, ids: torch.Tensor, seed: int = 1, runner: Any = None, **keys: Any) -> Any:
    torch.manual_seed(seed)
    solver = CVFPPhase1Solver(CVFPPhase1Settings(**keys))
    return solver.fit(model, ids, runner or CPURunner(), RecordingProgress())


# --- spec §3 written out plainly, as an independent reference ------------------------------------

def spec_noise(n: int, width: int, sigma: float, seed: int, iteration: int) -> torch.Tensor:
    """The noise definition: block b of NOISE_ROWS positions is randn from a generator seeded by
    SeedSequence([seed, iteration, b])."""
    blocks = []
    for b in range(-(-n // jacobi_pass.NOISE_ROWS)):
        state = np.random.SeedSequence([seed, iteration, b]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        blocks.append(torch.randn(jacobi_pass.NOISE_ROWS, width, generator=generator))
    return torch.cat(blocks)[:n] * sigma


def naive_phase1(model: TinyModel, ids: torch.Tensor, s: CVFPPhase1Settings, seed: int
                 ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Token-by-token rollout, explicit chunk loop, one Adam step per pass, no shortcuts."""
    torch.manual_seed(seed)
    block, tokens, width = model.context_block, model.token_inputs(ids), model.context_dim
    n = tokens.shape[0]

    def f(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return block.step(c, block.project_tokens(x))[-1]

    params = list(block.parameters())
    adam = torch.optim.Adam(params, lr=s.learning_rate)
    if s.init == "rollout":
        with torch.no_grad():
            rows, c = [], torch.zeros(1, width)
            for i in range(n):
                c = f(c, tokens[i:i + 1])
                rows.append(c)
            p = torch.cat(rows)
    else:
        p = torch.randn(n, width) * 0.01
    history = []
    for k in range(1, s.max_iterations):
        incoming = torch.cat([p[-1:], p[:-1]])
        if s.context_noise > 0:
            incoming = incoming + spec_noise(n, width, s.context_noise, seed, k)
        adam.zero_grad()
        if s.loss_scope == "stream":
            o = f(incoming, tokens)
            cvfp = ((o - p) ** 2).mean()
            div = -torch.linalg.norm(o - o.mean(0, keepdim=True)) / n
            loss = (1 - s.dist_reg_weight) * cvfp + s.dist_reg_weight * div
            if torch.isfinite(loss):  # a non-finite loss is dropped (nonfinite = "skip")
                loss.backward()
            stats = [(loss.item(), cvfp.item(), div.item(), n)]
            outputs = [o.detach()]
        else:
            starts = range(0, n, s.batch_size)
            stats, outputs = [], []
            for a in starts:
                o = f(incoming[a:a + s.batch_size], tokens[a:a + s.batch_size])
                cvfp = ((o - p[a:a + s.batch_size]) ** 2).mean()
                div = -torch.linalg.norm(o - o.mean(0, keepdim=True)) / o.shape[0]
                loss = (1 - s.dist_reg_weight) * cvfp + s.dist_reg_weight * div
                if torch.isfinite(loss):  # dropped, but still counted in the mean over chunks
                    (loss / len(starts)).backward()
                stats.append((loss.item(), cvfp.item(), div.item(), o.shape[0]))
                outputs.append(o.detach())
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        adam.step()
        o = torch.cat(outputs)
        rate = (((o - p) ** 2).mean(1) < s.convergence_threshold).float().mean().item()
        p = o
        weighted = [sum(v[i] * v[3] for v in stats) / n for i in range(3)]  # token-weighted chunk values
        history.append(dict(zip(["loss", "cvfp_loss", "diversity_loss"], weighted, strict=True),
                            convergence_rate=rate))
        if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
            break
    return p, history


# --- settings and registration --------------------------------------------------------------------

def test_defaults_are_the_v2_values_and_unknown_keys_are_rejected() -> None:
    s = CVFPPhase1Settings()
    assert s.model_dump() == {
        "learning_rate": 0.002, "min_iterations": 5, "max_iterations": 40, "convergence_threshold": 0.03,
        "min_converged_ratio": 0.95, "context_noise": 0.1, "dist_reg_weight": 0.5, "batch_size": 8000,
        "grad_clip": 1.0, "init": "rollout", "loss_scope": "chunk", "nonfinite": "stop", "solve": "auto",
        "solve_tolerance": 1e-5}
    assert all(f.description for f in CVFPPhase1Settings.model_fields.values())
    with pytest.raises(ValidationError):
        CVFPPhase1Settings(batch_sise=10)  # type: ignore[call-arg]


def test_registers_cvfp_with_its_settings() -> None:
    seen: dict[str, Any] = {}
    fixed_point.register_solvers(lambda name, factory, **kw: seen.update({name: (factory, kw)}))
    factory, kw = seen["cvfp"]
    assert kw["settings"] is CVFPPhase1Settings and kw["description"]
    assert isinstance(factory(CVFPPhase1Settings(max_iterations=3)), CVFPPhase1Solver)


# --- Phase 1 ----------------------------------------------------------------------------------------

def test_iteration_one_by_hand_with_wrap_around() -> None:
    """F(c, x) = c/2 + x on 4 tokens: P⁰ = (1,0), (.5,1), (1.25,1.5), (.625,.75). Pass 1 gives
    token 0 the wrapped context P⁰_3, so O_0 = (1.3125, .375) and only token 0 changes."""
    model, ids = linear(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    report = fit(model, ids, context_noise=0.0, max_iterations=2, solve="sequential")
    [h] = report.history
    cvfp = ((5 / 16) ** 2 + (3 / 8) ** 2) / 8  # only token 0 moved: (.3125, .375); mean over 4·2 elements
    diversity = -math.sqrt(1223 / 1024) / 4  # rows minus their mean (59/64, 29/32), Frobenius norm / 4
    assert h["cvfp_loss"] == pytest.approx(cvfp, rel=1e-6)
    assert h["diversity_loss"] == pytest.approx(diversity, rel=1e-6)
    assert h["loss"] == pytest.approx(0.5 * cvfp + 0.5 * diversity, rel=1e-6)
    assert h["convergence_rate"] == 0.75  # token 0's mean square change 0.119 > τ = 0.03
    assert report.convergence_rate == 0.75
    assert (report.iterations, report.tokens, report.token_evaluations) == (2, 4, 8)
    expected = torch.tensor([[1.3125, 0.375], [0.5, 1.0], [1.25, 1.5], [0.625, 0.75]])
    torch.testing.assert_close(report.contexts, expected)  # P¹ = O¹: computed with the pre-step weights
    assert model.context_block.a.item() != 0.5  # one Adam step was taken


@pytest.mark.parametrize(("init", "scope"), [("rollout", "chunk"), ("random", "chunk"), ("random", "stream")])
def test_matches_a_naive_implementation_of_spec_3(init: str, scope: str) -> None:
    model, ids = tiny(n=37)
    reference = copy.deepcopy(model)
    s = CVFPPhase1Settings(init=init, loss_scope=scope, batch_size=16, max_iterations=5, solve="sequential",
                           learning_rate=0.01)
    torch.manual_seed(7)
    report = CVFPPhase1Solver(s).fit(model, ids, CPURunner(), RecordingProgress())
    contexts, history = naive_phase1(reference, ids, s, seed=7)
    torch.testing.assert_close(report.contexts, contexts, atol=1e-4, rtol=1e-4)  # float noise, amplified
    assert len(report.history) == len(history) == 4
    for mine, theirs in zip(report.history, history, strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def previous_algorithm(model: TinyModel, ids: torch.Tensor, s: CVFPPhase1Settings, seed: int
                       ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The noise-free pass as it was before it became in-place: whole-stream token inputs, a
    shifted copy of the contexts, a new output tensor and the per-token change, every pass."""
    torch.manual_seed(seed)
    block, tokens, n, width, w = model.context_block, model.token_inputs(ids), ids.shape[0], model.context_dim, \
        s.dist_reg_weight
    params = list(block.parameters())
    adam = torch.optim.Adam(params, lr=s.learning_rate)
    previous = per_layer_rollout(model, ids)[-1] if s.init == "rollout" else torch.randn(n, width) * 0.01
    history = []
    for k in range(1, s.max_iterations):
        adam.zero_grad(set_to_none=True)
        inputs = torch.cat([previous[-1:], previous[:-1]])
        outputs, change = previous.new_empty(n, width), previous.new_empty(n)
        stream = s.loss_scope == "stream"
        bounds = [(0, n)] if stream else [(a, min(a + s.batch_size, n)) for a in range(0, n, s.batch_size)]
        sums = torch.zeros(3, dtype=torch.float64)
        for a, b in bounds:
            x, c, target = tokens[a:b], inputs[a:b], previous[a:b]
            if stream:
                with torch.no_grad():
                    out = block.step(c, block.project_tokens(x))[-1]
                    per_token = (out - target).pow(2).mean(1)
                    mean = out.sum(0) / n
                    spread = (out - mean).pow(2).sum().reshape(1).sqrt()
                    cvfp, diversity = per_token.sum().reshape(1) / n, -spread / n
                    loss = ((1 - w) * cvfp + w * diversity).squeeze(0)
                o = block.step(c, block.project_tokens(x))[-1]
                ((1 - w) * (o - target).pow(2).sum() / (n * width)
                 - w * (o * (out - mean)).sum() / (spread.squeeze(0) * n)).backward()
            else:
                out = block.step(c, block.project_tokens(x))[-1]
                per_token = (out - target).pow(2).mean(1)
                cvfp, diversity = per_token.mean(), -(out - out.mean(0)).norm() / (b - a)
                loss = (1 - w) * cvfp + w * diversity
                (loss / len(bounds)).backward()
            outputs[a:b], change[a:b] = out.detach(), per_token.detach()
            sums += torch.stack([t.detach().double().reshape(()) * (b - a) for t in (loss, cvfp, diversity)])
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        adam.step()
        previous = outputs
        rate = (change < s.convergence_threshold).float().mean().item()
        history.append(dict(zip(["loss", "cvfp_loss", "diversity_loss"], (sums / n).tolist(), strict=True),
                            convergence_rate=rate))
        if k + 1 >= s.min_iterations and rate >= s.min_converged_ratio:
            break
    return previous, history


@pytest.mark.parametrize(("init", "scope", "batch"),
                         [("rollout", "chunk", 16), ("random", "chunk", 16), ("rollout", "stream", 64)])
def test_the_in_place_pass_equals_the_previous_algorithm_without_noise(init: str, scope: str, batch: int) -> None:
    """One [n, C] buffer overwritten chunk by chunk gives what separate input, output and target
    tensors gave (37 tokens: two full chunks of 16 and a partial one; the stream in one piece, as
    the reference computes it: piecewise sums round differently, as they always did)."""
    model, ids = tiny(n=37)
    reference = copy.deepcopy(model)
    s = CVFPPhase1Settings(init=init, loss_scope=scope, batch_size=batch, max_iterations=6, context_noise=0.0,
                           solve="sequential", learning_rate=0.01, min_iterations=6)
    torch.manual_seed(7)
    report = CVFPPhase1Solver(s).fit(model, ids, CPURunner(), RecordingProgress())
    contexts, history = previous_algorithm(reference, ids, s, seed=7)
    torch.testing.assert_close(report.contexts, contexts, atol=1e-6, rtol=0)
    for mine, theirs in zip(report.history, history, strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scope", ["chunk", "stream"])
def test_micro_batches_give_the_same_step(scope: str) -> None:
    """After an OOM fallback the runner's micro-batch splits chunks; the update must not change."""
    whole, ids = tiny(n=40, **WELL_CONDITIONED)  # 4-wide LayerNorms amplify rounding beyond 1e-5
    pieces = copy.deepcopy(whole)
    keys = dict(batch_size=16, max_iterations=3, loss_scope=scope, init="random")
    a = fit(whole, ids, **keys)
    b = fit(pieces, ids, runner=CPURunner(micro=5), **keys)
    torch.testing.assert_close(a.contexts, b.contexts, atol=1e-5, rtol=1e-5)
    for p, q in zip(whole.parameters(), pieces.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_same_seed_is_bit_identical_and_noise_is_the_only_randomness() -> None:
    runs = []
    for seed, noise in [(1, 0.1), (1, 0.1), (2, 0.1), (1, 0.0), (2, 0.0)]:
        model, ids = tiny()
        report = fit(model, ids, seed=seed, context_noise=noise, max_iterations=4)
        runs.append((report.contexts, [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])  # other seed, other noise
    assert torch.equal(runs[3][0], runs[4][0])  # no noise (rollout init): the seed does not matter


def test_noise_depends_on_the_position_only() -> None:
    """However a pass is cut (chunks, micro-batches, active rows, ranks), a position gets the same noise."""
    positions = torch.arange(3000)

    def draw(rows: torch.Tensor, seed: int = 3, iteration: int = 2) -> torch.Tensor:
        return jacobi_pass.context_noise(rows, 5, 0.1, seed, iteration, torch.device("cpu"))

    whole = draw(positions)
    torch.testing.assert_close(whole, spec_noise(3000, 5, 0.1, 3, 2), rtol=0, atol=0)
    pieces = torch.cat([draw(positions[a:b]) for a, b in [(0, 7), (7, 1500), (1500, 3000)]])
    assert torch.equal(pieces, whole)
    scattered = positions[5::37]
    assert torch.equal(draw(scattered), whole[scattered])
    assert not torch.equal(draw(positions, iteration=3), whole) and not torch.equal(draw(positions, seed=4), whole)


def test_stop_rule_respects_min_iterations() -> None:
    model, ids = tiny()
    report = fit(model, ids, convergence_threshold=1e9, min_iterations=3)  # every token converged at once
    assert report.iterations == 3 and len(report.history) == 2 and report.convergence_rate == 1.0


def test_max_iterations_counts_iteration_zero() -> None:
    model, ids = tiny()
    report = fit(model, ids, convergence_threshold=0.0, max_iterations=4)  # never converges
    assert report.iterations == 4 and [h["iteration"] for h in report.history] == [1, 2, 3]
    assert report.token_evaluations == 4 * ids.shape[0]  # rollout + 3 passes
    model, ids = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    only_rollout = fit(model, ids, max_iterations=1)
    assert (only_rollout.iterations, only_rollout.history, only_rollout.convergence_rate) == (1, [], 0.0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    torch.testing.assert_close(only_rollout.contexts, per_layer_rollout(model, ids)[-1])


def test_progress_and_history_report_every_pass() -> None:
    model, ids = tiny()
    progress = RecordingProgress()
    torch.manual_seed(1)
    report = CVFPPhase1Solver(CVFPPhase1Settings(max_iterations=3)).fit(model, ids, CPURunner(), progress)
    kinds = [(e[0], e[1]) for e in progress.events]
    assert kinds == [("start", "phase1")] + [("advance", "phase1")] * 3 + [("finish", "phase1")]
    assert progress.events[2][2]["iteration"] == 1 and {"loss", "rate"} <= set(progress.events[2][2])
    assert len(progress.messages) == 1 and "iteration 1" in progress.messages[0]  # what the first rate measures
    assert set(report.history[0]) == {"iteration", "loss", "cvfp_loss", "diversity_loss", "convergence_rate",
                                      "seconds"}
    assert report.extra["iteration0"]["init"] == "rollout"


def _poisoned(n: int = 16) -> tuple[TinyModel, torch.Tensor]:
    model, ids = tiny(n=n)
    model.table[10] = float("nan")  # chunk 1 of 2 (batch 8) turns non-finite at pass 1
    return model, ids


def test_nonfinite_loss_stops_naming_phase_iteration_and_chunk() -> None:
    model, ids = _poisoned()
    with pytest.raises(RunFailed, match=r"phase 1: non-finite loss at iteration 1, chunk 1; no step has been taken "
                                        r"yet, so the learning rate is not the cause: .*check the embedding"):
        fit(model, ids, batch_size=8, init="random")


def test_nonfinite_skip_drops_the_chunk_and_keeps_training() -> None:
    """`skip` drops only the non-finite chunk's gradient: chunk 0 still trains (its loss still divided by
    both chunks), the NaN outputs are written and spread a row per pass, and a NaN row never counts as
    converged. So the run equals the naive reference that leaves that chunk's backward out."""
    model, ids = _poisoned()
    reference = copy.deepcopy(model)
    keys: dict[str, Any] = dict(batch_size=8, init="random", nonfinite="skip", max_iterations=3)
    report = fit(model, ids, **keys)
    contexts, history = naive_phase1(reference, ids, CVFPPhase1Settings(**keys), seed=1)
    assert report.iterations == 3 and len(report.history) == len(history) == 2
    assert torch.isnan(report.contexts).any(dim=1).tolist() == [i in (10, 11) for i in range(16)]
    torch.testing.assert_close(report.contexts, contexts, atol=1e-5, rtol=1e-5, equal_nan=True)
    for mine, theirs in zip(report.history, history, strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_fit_trains_only_phase1_parameters_of_the_real_model() -> None:
    cvfp = pytest.importorskip("newllm_kit_plugins.cvfp.model")
    torch.manual_seed(0)
    model = cvfp.CVFPArchitecture(cvfp.CVFPSettings(layers=2, context_dim=8, embedding_dim=6,
                                                    num_input_tokens=2)).build(30)
    ids = torch.randint(0, 30, (40,), dtype=torch.int32)  # int32 ids (a memory-mapped token cache) will do
    token_block = [p.detach().clone() for p in model.token_block.parameters()]
    first = model.context_block.splits[0][0].linear.weight.detach().clone()
    report = fit(model, ids, max_iterations=3, batch_size=16)
    assert report.contexts.shape == (40, 8) and report.iterations == 3
    assert all(torch.equal(p, q) for p, q in zip(model.token_block.parameters(), token_block, strict=True))
    assert model.embedding.weight.grad is None  # token inputs are computed without gradients
    weight = model.context_block.splits[0][0].linear.weight
    assert not torch.equal(weight[:, 8:], first[:, 8:])  # the token half (project_tokens) is trained too


@pytest.mark.parametrize("solver", ["cvfp", "gradual-decrease"])
@pytest.mark.parametrize("solve", ["sequential", "chunked"])
def test_no_whole_stream_token_inputs_exist(monkeypatch: pytest.MonkeyPatch, solver: str, solve: str) -> None:
    """Token inputs are computed a chunk, block or gather at a time: never for all 3,000 positions."""
    from newllm_kit_plugins.cvfp.gradual_decrease import GradualDecreaseSettings, GradualDecreaseSolver

    monkeypatch.setattr(frozen_solve, "BLOCK", 512)
    model, ids = tiny(n=3000, **WELL_CONDITIONED)
    sizes: list[int] = []
    lookup = model.token_inputs
    monkeypatch.setattr(model, "token_inputs", lambda rows: sizes.append(rows.shape[0]) or lookup(rows))
    keys = dict(batch_size=256, max_iterations=3, solve=solve)
    chosen: Any = (CVFPPhase1Solver(CVFPPhase1Settings(**keys)) if solver == "cvfp"
                   else GradualDecreaseSolver(GradualDecreaseSettings(**keys, min_iterations=2)))
    torch.manual_seed(1)
    chosen.fit(model, ids, CPURunner(), RecordingProgress())
    chosen.solve(model, ids, CPURunner())
    assert sizes and max(sizes) <= 512


class FlakyBlock(nn.Module):
    """Wraps a block; its `fail_at`-th training forward (1-based; any forward unless `training_only`)
    raises an out-of-memory error, once."""

    def __init__(self, block: nn.Module, fail_at: int, training_only: bool = True) -> None:
        super().__init__()
        self.inner, self.fail_at, self.training_only, self.calls = block, fail_at, training_only, 0

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.inner.project_tokens(tokens))

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        if torch.is_grad_enabled() or not self.training_only:
            self.calls += 1
            if self.calls == self.fail_at:
                raise torch.OutOfMemoryError("injected: out of memory")
        return cast(list[torch.Tensor], self.inner.step(context, projected))


class ShrinkingRunner(CPURunner):
    """Halves its micro-batch after an out-of-memory error, like a runner with auto_batch."""

    def handle_oom(self, error: BaseException, batch: int) -> bool:
        self.micro = self.micro_batch(batch) // 2
        return True


@pytest.mark.parametrize(("scope", "micro", "fail_at"), [("chunk", None, 2), ("stream", 10, 3)])
def test_an_oom_mid_pass_resumes_where_it_stopped(scope: str, micro: int | None, fail_at: int) -> None:
    """Rows written before the error keep this pass's outputs: the retry continues from the failed
    piece (chunk 1; the stream's third micro-batch) and the run equals one without the error."""
    clean, ids = tiny(n=40)
    flaky = copy.deepcopy(clean)
    flaky.context_block = FlakyBlock(flaky.context_block, fail_at)
    keys = dict(batch_size=16, max_iterations=3, loss_scope=scope)
    a = fit(clean, ids, runner=CPURunner(micro=micro), **keys)
    runner = ShrinkingRunner(micro=micro)
    b = fit(flaky, ids, runner=runner, **keys)
    assert flaky.context_block.calls > fail_at and runner.micro == (micro or 16) // 2
    torch.testing.assert_close(b.contexts, a.contexts, atol=1e-5, rtol=1e-5)
    for p, q in zip(clean.context_block.parameters(), flaky.context_block.inner.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_an_oom_that_cannot_be_retried_is_one_line_naming_phase_memory_and_setting() -> None:
    from newllm_kit_plugins.runners.local import CPURunner as RealCPURunner

    for runner in (CPURunner(), RealCPURunner()):  # refuses by returning False / raising its own UserError
        model, ids = tiny(n=40)
        model.context_block = FlakyBlock(model.context_block, 1)
        with pytest.raises(RunFailed, match=r"^phase 1: out of memory on cpu \(estimated [0-9.]+ GiB: .* 40 tokens"
                                            r".*\); set solver\.batch_size = 8, or runner\.auto_batch = true"):
            fit(model, ids, runner=runner, batch_size=16)
    model, ids = tiny(n=40)
    model.context_block = FlakyBlock(model.context_block, 1, training_only=False)
    with pytest.raises(RunFailed, match=r"^frozen solve: out of memory on cpu .* 40 positions .*; set "
                                        r"runner\.context_store = \"disk\""):
        CVFPPhase1Solver(CVFPPhase1Settings(solve="sequential")).solve(model, ids, CPURunner())


def test_phase1_contexts_live_where_runner_context_store_says() -> None:
    """host and disk keep Phase 1's buffer in host memory (a pass copies each chunk in and out);
    device and, on a CPU, auto keep it on the runner's device."""
    from types import SimpleNamespace

    def runner(store: str, device: str) -> Any:
        return SimpleNamespace(context_store=store, context_dtype="fp32", memory_fraction=0.5,
                               device=torch.device(device))

    assert fixed_point.buffer_device(runner("host", "cuda"), 10, 4) == torch.device("cpu")
    assert fixed_point.buffer_device(runner("disk", "cuda"), 10, 4) == torch.device("cpu")
    assert fixed_point.buffer_device(runner("device", "cuda"), 10, 4) == torch.device("cuda")
    assert fixed_point.buffer_device(runner("auto", "cpu"), 10, 4) == torch.device("cpu")
    assert fixed_point.buffer_device(CPURunner(), 10, 4) == torch.device("cpu")  # a runner without the setting


# --- frozen solves ---------------------------------------------------------------------------------

# Tiny LayerNorms over a handful of features amplify rounding; with these widths the fp32 rollout
# stays within ~2e-6 of float64, so a 1e-5 tolerance is meaningful (gain ≈ 0.67).
WELL_CONDITIONED: dict[str, Any] = {"context_dim": 8, "widths": (12, 10, 8), "damp": 0.3}


def per_layer_rollout(model: Any, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The batch-1 rollout keeping every layer's output, as the solves used to return it."""
    block = copy.deepcopy(model.context_block).to(dtype)
    with torch.no_grad():
        projected = block.project_tokens(model.token_inputs(ids).to(dtype))
        context, layers = projected.new_zeros(1, model.context_dim), []
        for i in range(ids.shape[0]):
            layers.append(block.step(context, projected[i:i + 1]))
            context = layers[-1][-1]
    return [torch.cat(layer) for layer in zip(*layers, strict=True)]


@contextlib.contextmanager
def recorded_steps(block: Any) -> Iterator[list[torch.Tensor]]:
    """Every final-layer output the block's `step` computes, in call order: the F evaluations a solve
    really made (one per row of each output), counted independently of what the solve reports."""
    outputs: list[torch.Tensor] = []
    step = block.step

    def recording(context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        layers = step(context, projected)
        outputs.append(layers[-1].detach().clone())
        return cast(list[torch.Tensor], layers)

    block.step = recording
    try:
        yield outputs
    finally:
        del block.step


# `estimate_gain`'s defaults: 8 windows, 16 warm-up steps and 32 measured steps, two rows per window each.
GAIN_WINDOWS, GAIN_WARMUP, GAIN_STEPS = 8, 16, 32
GAIN_CALLS = [GAIN_WINDOWS] * GAIN_WARMUP + [2 * GAIN_WINDOWS] * GAIN_STEPS


@dataclass(frozen=True)
class ExactGain:
    gain: float
    scale: float


def _final_layer(block: Any, projected: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda context: block.step(context, projected)[-1]


def jvp_gain(model: Any, ids: torch.Tensor) -> ExactGain:
    """ρ as `estimate_gain` defines it (power iteration along the stream in evenly spaced windows from a
    zero context, the same seeded start direction, geometric-mean growth over the last 3/4 of the steps,
    worst window) and the largest context norm seen, with exact Jacobian-vector products in float64
    instead of finite differences of fp32 rollouts. Rows are independent, so the windows share a batch."""
    block = copy.deepcopy(model.context_block).double()
    n, width, span = ids.shape[0], model.context_dim, GAIN_WARMUP + GAIN_STEPS
    last = max(n - span, 0)
    starts = torch.tensor(sorted({round(w * last / (GAIN_WINDOWS - 1)) for w in range(GAIN_WINDOWS)}))
    positions = (starts.unsqueeze(1) + torch.arange(span)).clamp(max=n - 1)
    with torch.no_grad():
        projected = block.project_tokens(token_rows(model, ids, positions.flatten()).double())
        projected = projected.view(len(starts), span, -1)
        context = torch.zeros(len(starts), width, dtype=torch.float64)
        for t in range(GAIN_WARMUP):
            context = block.step(context, projected[:, t])[-1]
    scale = context.norm(dim=1).max().item()
    tangent = torch.randn(len(starts), width, generator=torch.Generator().manual_seed(0)).double()
    tangent, logs = tangent / tangent.norm(dim=1, keepdim=True), []
    with warnings.catch_warnings():  # forward AD's first use scripts its decompositions
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        for t in range(GAIN_WARMUP, span):
            context, image = cast(tuple[torch.Tensor, torch.Tensor],
                                  jvp(_final_layer(block, projected[:, t]), (context,), (tangent,)))
            growth = image.norm(dim=1, keepdim=True)
            if t >= GAIN_WARMUP + GAIN_STEPS // 4:
                logs.append(growth.log())
            tangent, scale = image / growth, max(scale, context.norm(dim=1).max().item())
    return ExactGain(torch.cat(logs, dim=1).mean(1).exp().max().item(), scale)


def jacobi_stop(changes: list[float], tolerance: float, n: int) -> int | None:
    """The sweep after which `jacobi`'s documented rule stops, from every sweep's max change Δ: Δ = 0, or
    Δ < tolerance with r (geometric-mean ratio of Δ over up to 8 sweeps back) ≥ 1 or Δ·r/(1 − r) below
    the tolerance; at sweep n + 1 in any case. None if no sweep in `changes` satisfies it."""
    for sweep, change in enumerate(changes, start=1):
        if change == 0 or sweep == n + 1:
            return sweep
        if sweep > 1 and change < tolerance:
            back = min(8, sweep - 1)
            earlier = changes[sweep - 1 - back]
            ratio = (change / earlier) ** (1 / back) if earlier > 0 else 0.0
            if ratio >= 1 or change * ratio / (1 - ratio) < tolerance:
                return sweep
    return None


def real_model(num_input_tokens: int, variant: str, damp: float, n: int = 600) -> tuple[Any, torch.Tensor]:
    """A small cvfp model whose context path is damped so the block contracts, and n random ids."""
    cvfp = pytest.importorskip("newllm_kit_plugins.cvfp.model")
    torch.manual_seed(0)
    settings = cvfp.CVFPSettings(layers=3, context_dim=16, embedding_dim=8, variant=variant,
                                 num_input_tokens=num_input_tokens)
    model = cvfp.CVFPArchitecture(settings).build(50)
    with torch.no_grad():
        for split in model.context_block.splits:
            for layer in split:
                layer.linear.weight[:, :layer.residual_width] *= damp
                if layer.proj is not None:
                    layer.proj.weight *= damp
    return model, torch.randint(0, 50, (n,))


@pytest.fixture(scope="module", params=["tiny", "cvfp-N2-every", "cvfp-N2-gradual"])
def frozen_case(request: pytest.FixtureRequest) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A contracting model, its stream's ids and the float64 rollout's final-layer contexts."""
    if request.param == "tiny":
        model, ids = tiny(n=600, **WELL_CONDITIONED)
    elif request.param == "cvfp-N2-every":
        model, ids = real_model(2, "token-every-layer", 0.1)  # gain ≈ 0.94: a long burn-in
    else:
        model, ids = real_model(2, "gradual-reduction", 0.3)  # gain ≈ 0.67
    return model, ids, per_layer_rollout(model, ids, torch.float64)[-1]


METHODS = ["sequential", "jacobi", "chunked", "auto"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_its_tolerance_against_float64(frozen_case: Any, method: str) -> None:
    model, ids, reference = frozen_case
    tolerance = 1e-5
    model.train()
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve=method, solve_tolerance=tolerance))
    result = solver.solve(model, ids, CPURunner())
    assert model.training  # restored
    assert result.method == ("chunked" if method == "auto" else method)
    [contexts] = result.layers
    assert contexts.shape == reference.shape and contexts.dtype == torch.float32 and not contexts.requires_grad
    error = (contexts.double() - reference).abs().max().item()
    assert error <= tolerance, (method, error)
    block = model.context_block
    first = block.step(torch.zeros(1, model.context_dim), block.project_tokens(model.token_inputs(ids[:1])))
    torch.testing.assert_close(contexts[0], first[-1][0].detach(), atol=1e-6, rtol=1e-6)  # from a zero context


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reports_the_work_it_did(frozen_case: Any, method: str) -> None:
    """Gain, burn-in, sweeps, first gap and evaluation count are those of the F evaluations the solve
    made (recorded call by call) under the documented rules, and the gain is the exact-JVP one."""
    model, ids, _ = frozen_case
    n, tolerance = ids.shape[0], 1e-5
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve=method, solve_tolerance=tolerance))
    with recorded_steps(model.context_block) as outputs:
        result = solver.solve(model, ids, CPURunner())
    rows = [o.shape[0] for o in outputs]
    assert result.token_evaluations == sum(rows)
    if method == "sequential":
        assert rows == [1] * n and result.iterations == n and result.gain is None and result.max_change is None
        return
    assert rows[:len(GAIN_CALLS)] == GAIN_CALLS
    exact = jvp_gain(model, ids)
    assert result.gain == pytest.approx(exact.gain, rel=1e-2)  # finite differences of 0.1 % vs exact JVPs
    assert result.extra["scale"] == pytest.approx(exact.scale, rel=1e-5)
    work, produced = rows[len(GAIN_CALLS):], outputs[len(GAIN_CALLS):]
    if method == "jacobi":
        assert work == [n] * len(work)  # whole-stream sweeps (n < BLOCK)
        previous = [torch.zeros(n, model.context_dim), *produced[:-1]]
        changes = [(new - old).abs().max().item() for old, new in zip(previous, produced, strict=True)]
        assert result.iterations == len(work) == jacobi_stop(changes, tolerance, n)
        assert result.max_change == changes[-1]
        return
    window, chunk = result.extra["window"], result.extra["chunk"]
    assert window == math.ceil(math.log(tolerance / (4 * result.extra["scale"])) / math.log(result.gain))
    chunks, steps = -(-n // chunk), window + chunk
    assert result.iterations == steps
    assert work[:steps] == [chunks] * steps  # every chunk, W tokens early, rolled as one batch
    assert work[steps] == chunks - 1 and all(r < chunks for r in work[steps:])  # all but the last run on
    stored = produced[window][1:]  # each later chunk's first own row, from its burn-in
    assert result.max_change == result.extra["burn_in_error"] == (produced[steps] - stored).abs().max().item()


@pytest.mark.parametrize("method", METHODS)
def test_solves_write_into_a_given_fp32_or_bf16_tensor(frozen_case: Any, method: str) -> None:
    """The caller's tensor (here on the CPU, as a host or memory-mapped store would be) is the result."""
    model, ids, reference = frozen_case
    solver = CVFPPhase1Solver(CVFPPhase1Settings(solve=method))
    plain = solver.solve(model, ids, CPURunner())
    out = torch.full(reference.shape, math.nan)
    result = solver.solve(model, ids, CPURunner(), out=out)
    assert result.layers[0] is out and torch.equal(out, plain.layers[0])
    half = torch.full(reference.shape, math.nan, dtype=torch.bfloat16)
    result = solver.solve(model, ids, CPURunner(), out=half)
    assert result.layers[0] is half and result.method == plain.method  # bf16 rounding is no disagreement
    torch.testing.assert_close(half.double(), reference, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_the_rows_a_rank_holds_are_those_rows_of_the_whole_solve(frozen_case: Any, method: str) -> None:
    """Ranks sharing a stream each write their own rows: a contiguous window (Phase 1's iteration 0
    under ddp) or a rank's slices of every Phase-2 batch, spread over the stream."""
    model, ids, reference = frozen_case
    n = ids.numel()
    windows = [RowMap.of(n, range(a, b)) for a, b in [(0, 250), (200, 450), (517, 600)]]
    slices = [batch_rows(n, 64, lambda size, r=r: contiguous_shard(size, r, 3)) for r in range(3)]
    for where in windows + slices:
        out = torch.full((where.rows, model.context_dim), math.nan)
        with torch.no_grad(), frozen_solve.full_precision_matmuls():
            frozen_solve.solve_frozen(model, ids, method, 1e-5, out=out, where=where)
        want = torch.cat([reference[a:b] for a, b in where.spans])
        assert (out.double() - want).abs().max().item() <= 1e-5, (method, where.spans[:2])
        if method == "sequential":  # one rollout, whichever rows are kept: bit for bit
            whole = frozen_solve.solve_frozen(model, ids, method, 1e-5).layers[-1]
            assert torch.equal(out, torch.cat([whole[a:b] for a, b in where.spans]))


@pytest.mark.parametrize(("num_input_tokens", "variant"),
                         [(1, "gradual-reduction"), (2, "gradual-reduction"), (2, "token-every-layer")])
@pytest.mark.parametrize("method", ["sequential", "auto"])
def test_per_layer_contexts_recomputed_from_the_final_layer_equal_the_rollout(
        num_input_tokens: int, variant: str, method: str) -> None:
    """h_1..h_L(i) = step(c_{i−1}, project(x_i)) from the stored c (c_{−1} = 0) and the ids alone equal
    the per-layer outputs the rollout used to keep, at the stream start and anywhere after it."""
    model, ids = real_model(num_input_tokens, variant, 0.3)
    layers = per_layer_rollout(model, ids)
    contexts = CVFPPhase1Solver(CVFPPhase1Settings(solve=method)).solve(model, ids, CPURunner()).layers[0]
    block = model.context_block
    with torch.no_grad():
        for start, stop in [(0, 1), (0, 64), (1, 9), (5, 77), (599, 600)]:
            before = contexts[start - 1:start] if start else torch.zeros(1, model.context_dim)
            incoming = torch.cat([before, contexts[start:stop - 1]])
            recomputed = block.step(incoming, block.project_tokens(token_span(model, ids, start, stop)))
            for h, kept in zip(recomputed, layers, strict=True):
                torch.testing.assert_close(h, kept[start:stop], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_input_tokens", [1, 2, 3])
def test_token_rows_gather_the_rows_of_the_whole_stream(num_input_tokens: int) -> None:
    """The gather twin of `token_span`: each row from its own N-id window, zeros before the start."""
    model, ids = real_model(num_input_tokens, "gradual-reduction", 1.0, n=40)
    positions = torch.tensor([0, 1, 2, 39, 5, 5, 17, 1])
    with torch.no_grad():
        torch.testing.assert_close(token_rows(model, ids, positions), model.token_inputs(ids)[positions],
                                   rtol=0, atol=0)


def rollout_from(block: Any, projected: torch.Tensor, width: int, start: int, stop: int) -> torch.Tensor:
    """c_{stop−1} of the rollout that enters position max(start, 0) with a zero context."""
    context = projected.new_zeros(1, width)
    for i in range(max(start, 0), stop):
        context = block.step(context, projected[i:i + 1])[-1]
    return context[0]


def test_chunked_repairs_a_too_short_burn_in() -> None:
    """With W = 1 every chunk start is wrong at first; running each row on into the next chunk fixes it.
    The first gap is chunk j − 1's row at position 50·j against chunk j's own 1-token burn-in there."""
    model, ids = tiny(n=300, **WELL_CONDITIONED)
    reference = per_layer_rollout(model, ids, torch.float64)[-1]
    out = torch.empty(300, 8)
    with torch.no_grad(), recorded_steps(model.context_block) as outputs:
        solved = frozen_solve.chunked(model.context_block, frozen_solve.Tokens(model, ids), out, RowMap.whole(300),
                                      window=1, chunk=50, tolerance=1e-5)
    assert solved is not None
    evaluations, first_gap = solved
    assert (out.double() - reference).abs().max().item() <= 1e-5
    rows = [o.shape[0] for o in outputs]
    assert rows[:51] == [6] * 51 and rows[51] == 5  # 6 chunks × (1 + 50) steps, then 5 rows run on
    assert evaluations == sum(rows)
    block: Any = copy.deepcopy(model.context_block).double()
    with torch.no_grad():
        projected = block.project_tokens(model.token_inputs(ids).double())
        gaps = [(rollout_from(block, projected, 8, 50 * (j - 1) - 1, 50 * j + 1)
                 - rollout_from(block, projected, 8, 50 * j - 1, 50 * j + 1)).abs().max().item() for j in range(1, 6)]
    assert min(gaps) > 1e-3  # every chunk start is wrong at first
    assert first_gap == pytest.approx(max(gaps), rel=1e-3)


def _non_contracting() -> tuple[TinyModel, torch.Tensor]:
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3))
    return linear(torch.randn(300, 3), a=1.01, rotation=rotation)  # gain 1.01


def test_auto_falls_back_to_sequential_on_a_non_contracting_block() -> None:
    model, ids = _non_contracting()
    with pytest.warns(RuntimeWarning, match="does not contract"):
        result = CVFPPhase1Solver(CVFPPhase1Settings(solve="auto")).solve(model, ids, CPURunner())
    assert result.method == "sequential" and result.gain == pytest.approx(1.01, rel=1e-3)
    assert "does not contract" in result.extra["warning"]
    torch.testing.assert_close(result.layers[0].double(), per_layer_rollout(model, ids, torch.float64)[0],
                               atol=1e-4, rtol=1e-5)


def test_explicit_jacobi_on_a_non_contracting_block_warns_and_rolls_out_once() -> None:
    """Jacobi from zero needs n sweeps (n² evaluations) where ρ ≥ 1: the sequential rollout is cheaper and exact."""
    model, ids = _non_contracting()
    with pytest.warns(RuntimeWarning, match="does not contract"), recorded_steps(model.context_block) as outputs:
        result = CVFPPhase1Solver(CVFPPhase1Settings(solve="jacobi")).solve(model, ids, CPURunner())
    assert result.method == "sequential" and result.iterations == ids.shape[0]
    rows = [o.shape[0] for o in outputs]
    assert rows == GAIN_CALLS + [1] * ids.shape[0]  # the gain estimate and one rollout, not n sweeps (n²)
    assert result.token_evaluations == sum(rows)
    torch.testing.assert_close(result.layers[0].double(), per_layer_rollout(model, ids, torch.float64)[0],
                               atol=1e-4, rtol=1e-5)


def test_auto_uses_the_rollout_for_short_streams_and_iteration_zero_does_not_warn() -> None:
    model, ids = tiny(n=50, damp=2.0)  # short and not contracting
    result = CVFPPhase1Solver(CVFPPhase1Settings()).solve(model, ids, CPURunner())
    assert result.method == "sequential" and result.gain is None
    model, ids = tiny(n=300, damp=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = fit(model, ids, max_iterations=2)
    assert report.extra["iteration0"]["method"] == "sequential"


def test_gain_estimate_tracks_the_contraction() -> None:
    """The finite-difference estimate equals the exact-JVP power iteration along the same windows, from
    a contracting block to an expanding one, and counts its own evaluations."""
    for damp in (0.2, 0.5, 2.0):
        model, ids = tiny(n=300, damp=damp)
        with torch.no_grad(), recorded_steps(model.context_block) as outputs:
            gain = frozen_solve.estimate_gain(model.context_block, frozen_solve.Tokens(model, ids), 4)
        exact = jvp_gain(model, ids)
        assert gain.gain == pytest.approx(exact.gain, rel=5e-3), (damp, gain, exact)
        assert gain.scale == pytest.approx(exact.scale, rel=1e-5)
        assert gain.scale == pytest.approx(2.0, rel=1e-3)  # LayerNorm output of width 4: norm √4
        assert [o.shape[0] for o in outputs] == GAIN_CALLS and gain.evaluations == sum(GAIN_CALLS)
    expected = math.ceil(math.log(1e-5 / (4 * 2.0)) / math.log(0.5))  # ρ^W · scale ≤ tolerance / 4
    assert frozen_solve.burn_in(frozen_solve.Gain(0.5, 2.0, 0), 1e-5) == expected


class RankView(CPURunner):
    """Rank `rank` of `world` for the sharding arithmetic (no real group: sums are the identity)."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world

    def shard(self, n: int) -> range:
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


@pytest.mark.parametrize(("n", "size", "world"),
                         [(10_000, 1000, 2), (9_500, 1000, 3), (2_001, 1000, 3), (1_500, 1000, 3)])
def test_phase1_shards_are_whole_chunks_covering_the_stream(n: int, size: int, world: int) -> None:
    settings = CVFPPhase1Settings(batch_size=size)
    if -(-n // size) < world:
        with pytest.raises(UserError, match=r"rank 2 of 3 without work; lower solver\.batch_size"):
            fixed_point.stream_shard(n, settings, RankView(2, world))
        return
    shards = [fixed_point.stream_shard(n, settings, RankView(r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % size == 0 for s in shards)  # same chunks, hence same losses, as one process
    stream = fixed_point.stream_shard(n, CVFPPhase1Settings(batch_size=size, loss_scope="stream"), RankView(0, 2))
    assert stream == range(0, n // 2 + n % 2)
