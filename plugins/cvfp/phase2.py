"""Phase 2: next-token training of the TokenBlock (and any trainable head) over frozen contexts.

The ContextBlock is frozen, so the caller solves both streams' contexts once and every epoch reuses
them (spec §7.3). Only the final-layer context of each position is kept; a batch's per-layer
contexts are one batched ContextBlock step away, c_{i−1} → h_1..h_L(i), so a stream costs C floats
per position instead of Σ d_j + T. The walk is the reference's (§4.3–4.4): stream order,
consecutive mini-batches, mean CE, clip, Adam, then validation and patience-based early stopping.
The epoch loop, early stopping, the micro-batched loss pass and the chunked head loss are the ones
every recipe shares (`newllm_kit.training`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from newllm_kit.documents import DocumentSums
from newllm_kit.errors import DataError
from newllm_kit.protocols import EvalOutputs, MemoryPolicy, Progress, Runner
from newllm_kit.training import (
    TrainReport,
    TrainState,
    head_cross_entropy,
    loss_pass,
    optimizer_step,
    spans,
    train_epochs,
)

from .contract import CVFPModel as Model
from .frozen_solve import full_precision_matmuls
from .row_map import RowMap, batch_rows
from .spans import token_span

Positions = Annotated[int, Field(ge=1, le=10**9)]  # bounded so a typo fails validation, not an allocation


class Phase2Settings(BaseModel):
    """The `[phase2]` section. Defaults are the v2 runs' (spec §4)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1, le=100_000, description="Maximum number of epochs.")
    patience: int = Field(default=1, ge=1, le=100_000,
                          description="Epochs without a lower val loss before stopping.")
    learning_rate: float = Field(default=0.001, gt=0, allow_inf_nan=False, description="Adam learning rate.")
    batch_size: Positions | Literal["auto"] = Field(
        default=1024, description='Positions per step, in stream order; "auto": the runner sizes it from '
                                  'device memory (gpu) or uses 512 (cpu), recorded in the results.')
    eval_batch_size: Positions | Literal["auto"] | None = Field(
        default=None, description='Positions per evaluation pass (None: batch_size; "auto": the runner\'s size).')
    grad_clip: float = Field(default=1.0, gt=0, description="Max gradient norm over the trained parameters.")
    restore_best: bool = Field(default=True, description="End on the best epoch's weights (False: on the "
                                                         "last epoch's, as the original did).")
    ce_chunk: int = Field(default=2048, ge=1, le=10**9,
                          description="Rows per [chunk, vocab] logits block of the loss.")
    train_contexts: Literal["rollout", "phase1"] = Field(
        default="rollout",
        description='Training-stream contexts: "rollout", the frozen sequential solve (v2\'s numbers); '
                    '"phase1", F(P_{i−1}, x_i) from Phase 1\'s final contexts in one batched pass, as the '
                    "reference's later code did (no sequential pass over the training stream).")
    compare_contexts: bool = Field(
        default=True, description="Record how far the phase1 contexts are from the rollout (cosine, MSE) "
                                  "on the first compare_tokens training tokens.")
    compare_tokens: int = Field(default=4096, ge=2, le=10**9,
                                description="Training tokens the context comparison covers.")


def input_weights(model: Model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights the token inputs read, by name (a tied, unfrozen embedding table).

    Phase 2 trains such a table as the output head, but the contexts were solved from token inputs
    of its values now: the per-batch token inputs and contexts must keep those values. Autograd
    finds the weights, whatever the architecture; usually there are none and nothing is copied."""
    named = {name: p for name, p in cast(nn.Module, model).named_parameters() if p.requires_grad}
    with torch.enable_grad():
        probe = model.token_inputs(ids[:1])
    if not named or not probe.requires_grad:
        return {}
    used = torch.autograd.grad(probe.sum(), list(named.values()), allow_unused=True)
    return {name: p.detach().clone() for (name, p), g in zip(named.items(), used, strict=True) if g is not None}


@contextmanager
def weights_as(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`module`'s named parameters hold `values` inside the block (swapped in, not copied)."""
    params = dict(module.named_parameters())
    saved = {name: params[name].data for name in values}
    try:
        for name, value in values.items():
            params[name].data = value
        yield
    finally:
        for name, value in saved.items():
            params[name].data = value


@dataclass
class Phase2Data:
    """One stream for Phase 2: position i reads context `contexts[i − 1]` (zeros for i = 0) and token i,
    and predicts ids[i + 1]. `contexts` is the frozen rollout's final layer, [n, C] on any device, in
    any dtype (a pinned host tensor or a memory-mapped file for long streams), or under ddp only the
    rows `rows` lists, those this rank's batch slices read; `input_weights` are the weights the
    contexts were solved with, where Phase 2 trains them (see `input_weights`)."""

    contexts: torch.Tensor
    ids: torch.Tensor
    input_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: RowMap | None = None  # the rows `contexts` holds, in order (None: all); a ddp rank's own
    documents: np.ndarray | None = None  # [D, 2] spans of the stream's documents: evaluation sums them per document

    def held(self, start: int, stop: int) -> torch.Tensor:
        """Context rows [start, stop) of the stream, from wherever this rank holds them."""
        return self.contexts[self.rows.local(start, stop) if self.rows is not None else slice(start, stop)]

    @property
    def positions(self) -> int:
        return self.ids.numel() - 1

    @torch.no_grad()
    def batch(self, model: Model, rows: range, to: torch.device
              ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-layer contexts, token inputs and targets of `rows` on `to`: the token inputs from the ids
        and every layer from one batched step of the frozen block, h_1..h_L(i) = F(c_{i−1}, x_i), in full
        fp32 (no TF32, as the frozen solve that made `contexts`)."""
        lo, hi = rows.start, rows.stop
        block = model.context_block
        with full_precision_matmuls():
            with weights_as(cast(nn.Module, model), self.input_weights):
                tokens = token_span(model, self.ids, lo, hi)
            previous = self.held(max(lo - 1, 0), hi - 1).to(to, non_blocking=True).to(tokens.dtype)
            if lo == 0:
                previous = torch.cat([previous.new_zeros(1, previous.shape[1]), previous])
            layers = block.step(previous, block.project_tokens(tokens))
        return layers, tokens, self.ids[lo + 1:hi + 1].to(to, torch.long)


@torch.no_grad()
def context_agreement(model: Model, phase1: Phase2Data, rollout: torch.Tensor, to: torch.device) -> dict[str, float]:
    """How close the contexts of the two Phase-2 paths are on the rows of `rollout`: the final layer of
    F(P_{i−1}, x_i) from `phase1`'s store (Phase 1's final contexts) against the sequential rollout's
    [m, C] contexts. The reference's own check when it adopted the fast path (spec §7 item 7)."""
    rows = range(0, rollout.shape[0])
    module = cast(nn.Module, model)
    was_training = module.training
    module.eval()
    with full_precision_matmuls():  # both paths in full fp32, as the rollout was solved
        fast = torch.cat([phase1.batch(model, span, to)[0][-1].float() for span in spans(rows, 4096)])
        module.train(was_training)
        slow = rollout.to(to, torch.float32)
        cosine = F.cosine_similarity(fast, slow, dim=1)
    return {"tokens": float(len(rows)), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "mse": float((fast - slow).pow(2).mean())}


def bytes_per_position(model: Model) -> int:
    """Cost model for an automatic batch: one position's per-layer contexts and token input in fp32,
    about five times over (recomputed inputs, layer activations kept for backward, gradients). The
    [chunk, V] logits of the loss are bounded by ce_chunk, not by the batch, so they are not part of it."""
    return 4 * 5 * (sum(model.layer_widths) + model.token_width)


def resolve_batch(requested: int | Literal["auto"], model: Model, runner: MemoryPolicy) -> int:
    """A number from the file, or the runner's choice (a collective under ddp: every rank calls it)."""
    return runner.batch_size(None if requested == "auto" else requested, bytes_per_position(model))


def _pass(model: Model, data: Phase2Data, rows: range, runner: Runner, chunk: int,
          grad_scale: float | None, documents: DocumentSums | None = None) -> tuple[float, int]:
    """NLL sum and hits over `rows` (`newllm_kit.training.loss_pass`), backpropagating loss × `grad_scale`
    if given; evaluation also adds them to `documents` per document."""
    attempt: list[DocumentSums] = []  # this attempt's per-document sums: a retried pass starts them over

    def losses(micro: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        attempt[:] = [] if documents is None else [documents.empty()]
        for span in spans(rows, micro):
            contexts, tokens, targets = data.batch(model, span, runner.device)
            with runner.autocast():
                weight, bias = model.output_head()
                states = model.token_states(contexts, tokens)
                if attempt:  # predicted tokens span.start + 1 … span.stop, by document
                    positions = torch.arange(span.start + 1, span.stop + 1, device=targets.device)
                    scored = attempt[0].score(states, weight, bias, targets, positions, chunk)
                else:
                    scored = head_cross_entropy(states, weight, bias, targets, chunk, count_correct=grad_scale is None)
            yield scored

    totals = loss_pass(cast(nn.Module, model), runner, len(rows), losses, grad_scale, phase="phase2")
    if documents is not None:
        documents.sums += attempt[0].sums
    return totals


@torch.no_grad()
def evaluate(model: Model, data: Phase2Data, settings: Phase2Settings, runner: Runner) -> EvalOutputs:
    """Summed NLL, top-1 hits and count over every position of `data`, in eval mode, summed over ranks,
    and the same per document of `data.documents` (exact: float64 NLL, whole counts). The totals are the
    documents' sums (the stream is one document where they are not known)."""
    module = cast(nn.Module, model)
    was_training = module.training
    module.eval()
    mine = runner.shard(data.positions)
    pieces = spans(mine, resolve_batch(settings.eval_batch_size or settings.batch_size, model, runner))
    documents = DocumentSums.of(data.documents, data.ids.numel(), runner.device)
    for rows in pieces:
        _pass(model, data, rows, runner, settings.ce_chunk, None, documents)
    module.train(was_training)
    if runner.world_size > 1:  # each rank scored its shard of the positions: [D, 3] float64, exact
        documents.sums = runner.all_reduce_sum(documents.sums)
    totals = documents.sums.sum(0).cpu()
    return EvalOutputs(nll_sum=float(totals[0]), correct=int(totals[1]), count=int(totals[2]),
                       documents=documents.result())


def store_rows(n: int, batch: int | None, runner: Runner) -> RowMap:
    """The rows of an n-token stream's store this rank reads: its slices of the training batches of
    `batch` positions, or (None) its shard of the evaluation positions. Every row once over all
    ranks; the whole stream over one process."""
    if runner.world_size == 1:
        return RowMap.whole(n)
    return batch_rows(n, max(n - 1, 1) if batch is None else batch, runner.shard)


def phase2_optimizer(model: Model, settings: Phase2Settings) -> tuple[list[nn.Parameter], torch.optim.Adam]:
    """The parameters Phase 2 trains and its Adam: one definition for training and for the recipe's
    check of a Phase-2 checkpoint, which must continue exactly this optimizer."""
    params = [p for p in model.param_groups()["phase2"] if p.requires_grad]
    return params, torch.optim.Adam(params, lr=settings.learning_rate)


def train_phase2(model: Model, train: Phase2Data, val: Phase2Data, settings: Phase2Settings, runner: Runner,
                 progress: Progress, *, start: TrainState | None = None,
                 on_epoch_end: Callable[[TrainState], None] | None = None, stream: str = "val") -> TrainReport:
    """Train `model.param_groups()["phase2"]` on frozen contexts with the shared epoch loop
    (`newllm_kit.training.train_epochs`): early stopping on the loss of `val` (the validation stream, or
    the development one: `stream` names it in the logged rows), a resumable state per epoch."""
    if train.positions < 1 or val.positions < 1:
        raise DataError("phase 2 needs at least 2 tokens in both the training and the validation stream")
    module = cast(nn.Module, model)
    params, optimizer = phase2_optimizer(model, settings)
    batch_size = resolve_batch(settings.batch_size, model, runner)
    batches = spans(range(train.positions), batch_size)

    def run_epoch(epoch: int) -> tuple[float, int]:
        train_nll = 0.0
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            part = runner.shard(len(batch))  # this rank's slice of the global batch: all ranks step together
            mine = range(batch.start + part.start, batch.start + part.stop)
            batch_nll, _ = _pass(model, train, mine, runner, settings.ce_chunk, grad_scale=1 / len(batch))
            train_nll += optimizer_step(params, optimizer, batch_nll, runner, settings.grad_clip,
                                        f"phase 2, epoch {epoch}, batch {step}",
                                        "lower phase2.learning_rate or check the contexts for NaN/inf")
        return train_nll, train.positions

    report = train_epochs(module, params, optimizer, epochs=settings.epochs, patience=settings.patience,
                          restore_best=settings.restore_best, phase="phase2", run_epoch=run_epoch,
                          evaluate=lambda: evaluate(model, val, settings, runner), progress=progress,
                          start=start, on_epoch_end=on_epoch_end, stream=stream)
    return replace(report, batch_size=batch_size)
