"""The shared epoch loop's resume state: what a checkpoint keeps of the random generators.

The host has no GPU, so the CUDA generator is the fake backend's (tests/fake_cuda.py), whose state is a
draw counter: each training epoch draws from it (as dropout on a GPU would), and a resumed run must
continue from the saved count, not from wherever the new process's generator happens to be.
"""

from __future__ import annotations

import torch
from fake_cuda import FakeCuda
from torch import nn

from newllm_kit.progress import NullProgress
from newllm_kit.protocols import EvalOutputs
from newllm_kit.training import TrainState, restore_rng, rng_states, train_epochs


def _train(cuda: FakeCuda, epochs: int, start: TrainState | None = None) -> list[TrainState]:
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


def test_a_checkpoint_keeps_the_cuda_generator_and_a_resume_restores_it(fake_cuda: FakeCuda) -> None:
    cuda = fake_cuda
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


def test_without_cuda_in_use_only_the_cpu_generator_is_kept(fake_cuda: FakeCuda) -> None:
    fake_cuda.initialized = False  # CUDA is there, but this process never used it
    saved = _train(fake_cuda, epochs=1)
    tensors, _ = saved[0].to_checkpoint()
    assert "rng" in tensors and "cuda_rng" not in tensors


def test_a_cuda_state_is_restored_only_where_cuda_is_available(fake_cuda: FakeCuda) -> None:
    fake_cuda.draws = 7
    _, state = rng_states()
    assert state is not None and int(state[0]) == 7
    fake_cuda.draws, fake_cuda.available = 40, False  # resumed on a host without CUDA: the state is skipped
    restore_rng(TrainState(rng=torch.get_rng_state(), cuda_rng=state))
    assert fake_cuda.draws == 40
    assert rng_states()[1] is None
    fake_cuda.available = True
    restore_rng(TrainState(rng=torch.get_rng_state(), cuda_rng=state))
    assert fake_cuda.draws == 7
