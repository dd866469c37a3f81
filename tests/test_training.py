"""The shared epoch loop's resume state: what a checkpoint keeps of the random generators.

The host has no GPU, so the CUDA generator is a stand-in whose state is a draw counter: each
training epoch draws from it (as dropout on a GPU would), and a resumed run must continue from the
saved count, not from wherever the new process's generator happens to be.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from newllm_kit.progress import NullProgress
from newllm_kit.protocols import EvalOutputs
from newllm_kit.training import TrainState, train_epochs


class FakeCudaGenerator:
    """torch.cuda's generator functions over a counter: get/set state, and one draw per epoch."""

    def __init__(self) -> None:
        self.draws = 0

    def get_rng_state(self) -> torch.Tensor:
        return torch.tensor([self.draws], dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.draws = int(state[0])


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCudaGenerator:
    fake = FakeCudaGenerator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    return fake


def _train(cuda: FakeCudaGenerator, epochs: int, start: TrainState | None = None) -> list[TrainState]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    saved: list[TrainState] = []

    def run_epoch(epoch: int) -> tuple[float, int]:
        cuda.draws += 3  # the epoch's dropout masks
        noise = torch.randn(4, 2)  # and a CPU draw
        optimizer.zero_grad()
        loss = model(noise).pow(2).sum()
        loss.backward()
        optimizer.step()
        return float(loss.detach()), 4

    def evaluate() -> EvalOutputs:
        return EvalOutputs(nll_sum=float(model.weight.detach().abs().sum()), count=1)

    train_epochs(model, params, optimizer, epochs=epochs, patience=10, restore_best=False, phase="test",
                 run_epoch=run_epoch, evaluate=evaluate, progress=NullProgress(), start=start,
                 on_epoch_end=saved.append)
    return saved


def test_a_checkpoint_keeps_the_cuda_generator_and_a_resume_restores_it(cuda: FakeCudaGenerator) -> None:
    straight = _train(cuda, epochs=3)
    assert [int(s.cuda_rng[0]) for s in straight if s.cuda_rng is not None] == [3, 6, 9]
    tensors, data = straight[0].to_checkpoint()
    after_one = TrainState.from_checkpoint(tensors, data)
    assert after_one.cuda_rng is not None and torch.equal(after_one.cuda_rng, straight[0].cuda_rng)

    cuda.draws = 200  # a new process: its generator is wherever it is
    resumed = _train(cuda, epochs=3, start=after_one)
    assert [s.epoch for s in resumed] == [2, 3]
    for a, b in zip(resumed, straight[1:], strict=True):
        assert a.cuda_rng is not None and b.cuda_rng is not None and torch.equal(a.cuda_rng, b.cuda_rng)
        assert a.rng is not None and b.rng is not None and torch.equal(a.rng, b.rng)
        assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)


def test_without_cuda_in_use_only_the_cpu_generator_is_kept() -> None:
    saved = _train(FakeCudaGenerator(), epochs=1)
    tensors, _ = saved[0].to_checkpoint()
    assert "rng" in tensors and "cuda_rng" not in tensors
