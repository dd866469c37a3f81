"""The `cvfp` solver: Phase 1 of spec §3 (by hand and against a naive re-implementation), the stop
rule, non-finite handling, determinism, and every frozen-solve method against float64 rollouts."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from newllm_kit_plugins import fixed_point, frozen_solve
from newllm_kit_plugins.fixed_point import CVFPSolver, CVFPSolverSettings
from pydantic import ValidationError
from torch import nn

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

    def start(self, phase: str, total: int | None) -> None:
        self.events.append(("start", phase, {"total": float(total or 0)}))

    def advance(self, phase: str, **fields: float) -> None:
        self.events.append(("advance", phase, fields))

    def finish(self, phase: str) -> None:
        self.events.append(("finish", phase, {}))


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
    """Just the Model members a solver reads."""

    def __init__(self, block: nn.Module, context_dim: int) -> None:
        super().__init__()
        self.context_block = block
        self.context_dim = context_dim

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": list(self.context_block.parameters()), "phase2": []}


def tiny(n: int = 48, seed: int = 0, **block: Any) -> tuple[TinyModel, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyModel(TinyBlock(**block), block.get("context_dim", 4))
    return model, torch.randn(n, 3)


def fit(model: Any, tokens: torch.Tensor, seed: int = 1, runner: Any = None, **keys: Any) -> Any:
    torch.manual_seed(seed)
    solver = CVFPSolver(CVFPSolverSettings(**keys))
    return solver.fit(model, tokens, runner or CPURunner(), RecordingProgress())


# --- spec §3 written out plainly, as an independent reference ------------------------------------

def naive_phase1(model: TinyModel, tokens: torch.Tensor, s: CVFPSolverSettings, seed: int
                 ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Token-by-token rollout, explicit chunk loop, one Adam step per pass, no shortcuts."""
    torch.manual_seed(seed)
    block, n, width = model.context_block, tokens.shape[0], model.context_dim
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
            incoming = incoming + torch.randn(n, width) * s.context_noise
        adam.zero_grad()
        if s.loss_scope == "stream":
            o = f(incoming, tokens)
            cvfp = ((o - p) ** 2).mean()
            div = -torch.linalg.norm(o - o.mean(0, keepdim=True)) / n
            loss = (1 - s.dist_reg_weight) * cvfp + s.dist_reg_weight * div
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
    s = CVFPSolverSettings()
    assert s.model_dump() == {
        "learning_rate": 0.002, "min_iterations": 5, "max_iterations": 40, "convergence_threshold": 0.03,
        "min_converged_ratio": 0.95, "context_noise": 0.1, "dist_reg_weight": 0.5, "batch_size": 8000,
        "grad_clip": 1.0, "init": "rollout", "loss_scope": "chunk", "nonfinite": "stop", "solve": "auto",
        "solve_tolerance": 1e-5}
    assert all(f.description for f in CVFPSolverSettings.model_fields.values())
    with pytest.raises(ValidationError):
        CVFPSolverSettings(batch_sise=10)  # type: ignore[call-arg]


def test_registers_cvfp_with_its_settings() -> None:
    seen: dict[str, Any] = {}
    fixed_point.register_solvers(lambda name, factory, **kw: seen.update({name: (factory, kw)}))
    factory, kw = seen["cvfp"]
    assert kw["settings"] is CVFPSolverSettings and kw["description"]
    assert isinstance(factory(CVFPSolverSettings(max_iterations=3)), CVFPSolver)


# --- Phase 1 ----------------------------------------------------------------------------------------

def test_iteration_one_by_hand_with_wrap_around() -> None:
    """F(c, x) = c/2 + x on 4 tokens: P⁰ = (1,0), (.5,1), (1.25,1.5), (.625,.75). Pass 1 gives
    token 0 the wrapped context P⁰_3, so O_0 = (1.3125, .375) and only token 0 changes."""
    model = TinyModel(LinearBlock(), 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    report = fit(model, x, context_noise=0.0, max_iterations=2, solve="sequential")
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
    model, x = tiny(n=37)
    reference = copy.deepcopy(model)
    s = CVFPSolverSettings(init=init, loss_scope=scope, batch_size=16, max_iterations=5, solve="sequential",
                           learning_rate=0.01)
    torch.manual_seed(7)
    report = CVFPSolver(s).fit(model, x, CPURunner(), RecordingProgress())
    contexts, history = naive_phase1(reference, x, s, seed=7)
    torch.testing.assert_close(report.contexts, contexts, atol=1e-4, rtol=1e-4)  # float noise, amplified
    assert len(report.history) == len(history) == 4
    for mine, theirs in zip(report.history, history, strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["chunk", "stream"])
def test_micro_batches_give_the_same_step(scope: str) -> None:
    """After an OOM fallback the runner's micro-batch splits chunks; the update must not change."""
    whole, x = tiny(n=40)
    pieces = copy.deepcopy(whole)
    keys = dict(batch_size=16, max_iterations=3, loss_scope=scope, init="random")
    a = fit(whole, x, **keys)
    b = fit(pieces, x, runner=CPURunner(micro=5), **keys)
    torch.testing.assert_close(a.contexts, b.contexts, atol=1e-5, rtol=1e-5)
    for p, q in zip(whole.parameters(), pieces.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_same_seed_is_bit_identical_and_noise_is_the_only_randomness() -> None:
    runs = []
    for seed, noise in [(1, 0.1), (1, 0.1), (2, 0.1), (1, 0.0), (2, 0.0)]:
        model, x = tiny()
        report = fit(model, x, seed=seed, context_noise=noise, max_iterations=4)
        runs.append((report.contexts, [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])  # other seed, other noise
    assert torch.equal(runs[3][0], runs[4][0])  # no noise (rollout init): the seed does not matter


def test_stop_rule_respects_min_iterations() -> None:
    model, x = tiny()
    report = fit(model, x, convergence_threshold=1e9, min_iterations=3)  # every token converged at once
    assert report.iterations == 3 and len(report.history) == 2 and report.convergence_rate == 1.0


def test_max_iterations_counts_iteration_zero() -> None:
    model, x = tiny()
    report = fit(model, x, convergence_threshold=0.0, max_iterations=4)  # never converges
    assert report.iterations == 4 and [h["iteration"] for h in report.history] == [1, 2, 3]
    assert report.token_evaluations == 4 * x.shape[0]  # rollout + 3 passes
    model, x = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    only_rollout = fit(model, x, max_iterations=1)
    assert (only_rollout.iterations, only_rollout.history, only_rollout.convergence_rate) == (1, [], 0.0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    block = model.context_block
    expected = frozen_solve.rollout(block, block.project_tokens(x), 4, keep_all=False)
    torch.testing.assert_close(only_rollout.contexts, expected[0].detach())


def test_progress_and_history_report_every_pass() -> None:
    model, x = tiny()
    progress = RecordingProgress()
    torch.manual_seed(1)
    report = CVFPSolver(CVFPSolverSettings(max_iterations=3)).fit(model, x, CPURunner(), progress)
    kinds = [(e[0], e[1]) for e in progress.events]
    assert kinds == [("start", "phase1")] + [("advance", "phase1")] * 3 + [("finish", "phase1")]
    assert progress.events[2][2]["iteration"] == 1 and {"loss", "rate"} <= set(progress.events[2][2])
    assert set(report.history[0]) == {"iteration", "loss", "cvfp_loss", "diversity_loss", "convergence_rate",
                                      "seconds"}
    assert report.extra["iteration0"]["init"] == "rollout"


def _poisoned(n: int = 16) -> tuple[TinyModel, torch.Tensor]:
    model, x = tiny(n=n)
    x[10] = float("nan")  # chunk 1 of 2 (batch 8) turns non-finite at pass 1
    return model, x


def test_nonfinite_loss_stops_naming_phase_iteration_and_chunk() -> None:
    model, x = _poisoned()
    with pytest.raises(RunFailed, match=r"phase 1: non-finite loss at iteration 1, chunk 1"):
        fit(model, x, batch_size=8, init="random")


def test_nonfinite_skip_drops_the_chunk_and_keeps_training() -> None:
    model, x = _poisoned()
    before = [p.detach().clone() for p in model.parameters()]
    report = fit(model, x, batch_size=8, init="random", nonfinite="skip", max_iterations=3)
    assert report.iterations == 3 and math.isnan(report.history[0]["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)]
    assert any(changed)  # chunk 0 still trained


def test_fit_trains_only_phase1_parameters_of_the_real_model() -> None:
    cvfp = pytest.importorskip("newllm_kit_plugins.cvfp")
    torch.manual_seed(0)
    model = cvfp.CVFPArchitecture(cvfp.CVFPSettings(layers=2, context_dim=8, embedding_dim=6,
                                                    num_input_tokens=2)).build(30)
    tokens = model.token_inputs(torch.randint(0, 30, (40,))).detach()
    token_block = [p.detach().clone() for p in model.token_block.parameters()]
    first = model.context_block.splits[0][0].linear.weight.detach().clone()
    report = fit(model, tokens, max_iterations=3, batch_size=16)
    assert report.contexts.shape == (40, 8) and report.iterations == 3
    assert all(torch.equal(p, q) for p, q in zip(model.token_block.parameters(), token_block, strict=True))
    weight = model.context_block.splits[0][0].linear.weight
    assert not torch.equal(weight[:, 8:], first[:, 8:])  # the token half (project_tokens) is trained too


# --- frozen solves ---------------------------------------------------------------------------------

# Tiny LayerNorms over a handful of features amplify rounding; with these widths the fp32 rollout
# stays within ~2e-6 of float64, so a 1e-5 tolerance is meaningful (gain ≈ 0.67).
WELL_CONDITIONED: dict[str, Any] = {"context_dim": 8, "widths": (12, 10, 8), "damp": 0.3}


def reference_rollout(block: Any, tokens: torch.Tensor, width: int) -> list[torch.Tensor]:
    """float64 sequential rollout: the ground truth every method must meet within tolerance."""
    exact = copy.deepcopy(block).double()
    with torch.no_grad():
        return frozen_solve.rollout(exact, exact.project_tokens(tokens.double()), width)


def real_model(num_input_tokens: int, variant: str, damp: float) -> tuple[Any, torch.Tensor]:
    """A small cvfp model whose context path is damped so the block contracts."""
    cvfp = pytest.importorskip("newllm_kit_plugins.cvfp")
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
        tokens = model.token_inputs(torch.randint(0, 50, (600,)))
    return model, tokens


@pytest.fixture(scope="module", params=["tiny", "cvfp-N2-every", "cvfp-N2-gradual"])
def frozen_case(request: pytest.FixtureRequest) -> tuple[Any, torch.Tensor, list[torch.Tensor]]:
    if request.param == "tiny":
        model, x = tiny(n=600, **WELL_CONDITIONED)
    elif request.param == "cvfp-N2-every":
        model, x = real_model(2, "token-every-layer", 0.1)  # gain ≈ 0.94: a long burn-in
    else:
        model, x = real_model(2, "gradual-reduction", 0.3)  # gain ≈ 0.67
    return model, x, reference_rollout(model.context_block, x, model.context_dim)


@pytest.mark.parametrize("method", ["sequential", "jacobi", "chunked", "auto"])
def test_every_method_meets_its_tolerance_against_float64(frozen_case: Any, method: str) -> None:
    model, x, reference = frozen_case
    tolerance = 1e-5
    model.train()
    solver = CVFPSolver(CVFPSolverSettings(solve=method, solve_tolerance=tolerance))
    result = solver.solve(model, x, CPURunner())
    assert model.training  # restored
    assert result.method == ("chunked" if method == "auto" else method)
    assert [h.shape for h in result.layers] == [h.shape for h in reference]
    error = max((h.double() - r).abs().max().item() for h, r in zip(result.layers, reference, strict=True))
    assert error <= tolerance, (method, error)
    assert not any(h.requires_grad for h in result.layers)
    block = model.context_block
    first = block.step(torch.zeros(1, model.context_dim), block.project_tokens(x[:1]))
    for h, f in zip(result.layers, first, strict=True):  # the stream starts from a zero context
        torch.testing.assert_close(h[0], f[0].detach(), atol=1e-6, rtol=1e-6)
    if method in ("auto", "chunked"):
        assert result.gain is not None and 0 < result.gain < 1
        window, chunk = result.extra["window"], result.extra["chunk"]
        assert window >= 1 and result.max_change is not None  # the measured burn-in error
        assert result.token_evaluations < 3 * x.shape[0] * (1 + window / chunk)
    if method == "jacobi":
        assert 1 < result.iterations < x.shape[0]


def test_chunked_repairs_a_too_short_burn_in() -> None:
    """With W = 1 every chunk start is wrong at first; running each row on into the next chunk fixes it."""
    model, x = tiny(n=300, **WELL_CONDITIONED)
    block, reference = model.context_block, reference_rollout(model.context_block, x, 8)
    with torch.no_grad():
        solved = frozen_solve.chunked(block, block.project_tokens(x), 8, window=1, chunk=50, tolerance=1e-5)
    assert solved is not None
    layers, evaluations, first_gap = solved
    assert first_gap > 1e-3  # the measured burn-in error
    assert max((h.double() - r).abs().max().item() for h, r in zip(layers, reference, strict=True)) <= 1e-5
    assert evaluations > 6 * 51  # the run-on cost something


def test_auto_falls_back_to_sequential_on_a_non_contracting_block() -> None:
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3))
    model = TinyModel(LinearBlock(3, a=1.01, rotation=rotation), 3)  # gain 1.01
    x = torch.randn(300, 3)
    with pytest.warns(RuntimeWarning, match="does not contract"):
        result = CVFPSolver(CVFPSolverSettings(solve="auto")).solve(model, x, CPURunner())
    assert result.method == "sequential" and result.gain == pytest.approx(1.01, rel=1e-3)
    assert "does not contract" in result.extra["warning"]
    torch.testing.assert_close(result.layers[0].double(), reference_rollout(model.context_block, x, 3)[0],
                               atol=1e-4, rtol=1e-5)


def test_explicit_jacobi_on_a_non_contracting_block_warns_and_rolls_out_once() -> None:
    """Jacobi from zero needs n sweeps (n² evaluations) where ρ ≥ 1: the sequential rollout is cheaper and exact."""
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3))
    model = TinyModel(LinearBlock(3, a=1.01, rotation=rotation), 3)
    x = torch.randn(300, 3)
    with pytest.warns(RuntimeWarning, match="does not contract"):
        result = CVFPSolver(CVFPSolverSettings(solve="jacobi")).solve(model, x, CPURunner())
    assert result.method == "sequential" and result.iterations == x.shape[0]
    assert result.token_evaluations < 4 * x.shape[0]  # the gain estimate plus one pass, not n sweeps (n²)
    torch.testing.assert_close(result.layers[0].double(), reference_rollout(model.context_block, x, 3)[0],
                               atol=1e-4, rtol=1e-5)


def test_auto_uses_the_rollout_for_short_streams_and_iteration_zero_does_not_warn() -> None:
    model, x = tiny(n=50, damp=2.0)  # short and not contracting
    result = CVFPSolver(CVFPSolverSettings()).solve(model, x, CPURunner())
    assert result.method == "sequential" and result.gain is None
    model, x = tiny(n=300, damp=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = fit(model, x, max_iterations=2)
    assert report.extra["iteration0"]["method"] == "sequential"


def test_gain_estimate_tracks_the_contraction() -> None:
    for damp, low, high in [(0.2, 0.05, 0.4), (0.5, 0.3, 0.7), (2.0, 1.0, 3.0)]:
        model, x = tiny(n=300, damp=damp)
        with torch.no_grad():
            gain = frozen_solve.estimate_gain(model.context_block, model.context_block.project_tokens(x), 4)
        assert low < gain.gain < high, (damp, gain)
        assert gain.scale == pytest.approx(2.0, rel=1e-3)  # LayerNorm output of width 4: norm √4
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
    settings = CVFPSolverSettings(batch_size=size)
    if -(-n // size) < world:
        with pytest.raises(UserError, match=r"rank 2 of 3 without work; lower solver\.batch_size"):
            fixed_point.stream_shard(n, settings, RankView(2, world))
        return
    shards = [fixed_point.stream_shard(n, settings, RankView(r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % size == 0 for s in shards)  # same chunks, hence same losses, as one process
    stream = fixed_point.stream_shard(n, CVFPSolverSettings(batch_size=size, loss_scope="stream"), RankView(0, 2))
    assert stream == range(0, n // 2 + n % 2)
