"""Training FLOPs per unit (`newllm_kit.flops`): each model's count per token against a hand count from its
layer shapes, each recipe's record against the same count of what it ran, and a resumed unit's record
against an uninterrupted one's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from newllm_kit_plugins.cvfp.model import CVFPModel, CVFPSettings, context_flops_per_token, token_flops_per_token
from newllm_kit_plugins.lm.gru import GRUArchitecture, GRUSettings
from newllm_kit_plugins.lm.transformer import TransformerArchitecture, TransformerSettings
from test_experiment import write_tiny
from test_lm import VOCAB, data_for, pattern_stream, recipe, unit_for
from torch import nn

from newllm_kit.errors import RunInterrupted
from newllm_kit.flops import SIX_N, flops_text, forward_flops_per_token, train_flops
from newllm_kit.plugins import load_plugins
from newllm_kit.protocols import UnitData
from newllm_kit.run import execute

E = 16


def transformer(**keys: Any) -> nn.Module:
    settings = TransformerSettings(**{"n_layer": 1, "n_head": 2, "n_embd": E, "block_size": 8, **keys})
    return TransformerArchitecture(settings).build(VOCAB)


def gru() -> nn.Module:
    return GRUArchitecture(GRUSettings(embedding_dim=E, hidden_size=24, layers=2)).build(VOCAB)


def transformer_by_hand(context: int) -> int:
    """One layer, n_embd 16, MLP 64: qkv 16·48, out 16·16, fc 16·64, proj 64·16; attention 2·2·T·16; head 2·16·V."""
    return 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16) + 4 * context * 16 + 2 * 16 * VOCAB


# Two layers of 24: three gates each read the input (16, then 24) and the state (24); projection 24 → 16.
GRU_BY_HAND = 2 * 3 * 24 * (16 + 24) + 2 * 3 * 24 * (24 + 24) + 2 * 24 * 16 + 2 * 16 * VOCAB


def test_a_transformer_counts_its_matmuls_and_attention_over_the_context() -> None:
    model = transformer()
    assert forward_flops_per_token(model, 8) == (transformer_by_hand(8), "layer shapes")
    assert forward_flops_per_token(model, 1) == (transformer_by_hand(1), "layer shapes")


def test_a_gru_counts_three_gates_per_layer_and_ignores_the_context() -> None:
    assert forward_flops_per_token(gru(), 8) == forward_flops_per_token(gru(), 1000) == (GRU_BY_HAND, "layer shapes")


def test_a_model_without_a_count_falls_back_to_2n_outside_the_tables_plus_the_tied_head() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.body = nn.Embedding(VOCAB, E), nn.Linear(E, E)

        def output_head(self) -> tuple[torch.Tensor, None]:
            return self.embedding.weight, None

    assert forward_flops_per_token(Plain(), 8) == (2 * (E * E + E) + 2 * VOCAB * E, SIX_N)


def test_cvfp_blocks_count_as_their_layer_shapes() -> None:
    """Gradual reduction, L = 2, C = T = E = 16: ContextLayer widths 24, 16; every TokenLayer 16 wide."""
    model = CVFPModel(CVFPSettings(layers=2, context_dim=16, embedding_dim=16), VOCAB)
    context = 2 * ((16 + 16) * 24 + 16 * 24 + 24 * 16 + 24 * 16)  # [h; x] → 24 + its projection, 24 → 16 + its
    assert context_flops_per_token(model) == context == 3840
    assert token_flops_per_token(model, include_head=True) == 2 * ((24 + 16) * 16 + (16 + 16) * 16) + 2 * 16 * VOCAB


def test_lm_records_train_and_eval_flops_of_what_it_ran(tmp_path: Path) -> None:
    """49 predictions in windows of 8 (six, then one of 1); 19 validation ones in 4 windows of 8, stride 4."""
    torch.manual_seed(0)
    data = data_for(pattern_stream(50), pattern_stream(20, phase=3))
    result = recipe(epochs=2, patience=10, window=8, eval_stride=4).train(transformer(), data, unit_for(tmp_path))
    record = result.record
    epoch = 48 * transformer_by_hand(8) + 1 * transformer_by_hand(1)
    assert record["epochs_run"] == 2 and record["flops_method"] == "layer shapes"
    assert record["flops"] == {"train": 3 * 2 * epoch, "eval": 2 * 32 * transformer_by_hand(8),
                               "total": 3 * 2 * epoch}
    assert record["train_flops"] == record["flops"]["total"] and set(record["seconds"]) == {"train"}
    assert ["train_flops", "FLOPs", False, False] in [[c.key, c.header, c.percent, c.mean] for c in result.columns]


def test_lm_with_a_development_split_evaluates_it_each_epoch_and_validation_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, val, dev = pattern_stream(40), pattern_stream(20, phase=3), pattern_stream(30, phase=5)
    data = UnitData(train_ids=train, val_ids=val, train_documents=data_for(train, val).train_documents,
                    vocab_size=VOCAB, dev_ids=dev)
    record = recipe(epochs=2, patience=10, window=8).train(gru(), data, unit_for(tmp_path)).record
    assert record["flops"] == {"train": 3 * 2 * 39 * GRU_BY_HAND, "eval": (2 * 29 + 19) * GRU_BY_HAND,
                               "total": 3 * 2 * 39 * GRU_BY_HAND}


ONE_MODEL = ['models=[{label = "A", variant = "gradual-reduction", layers = 2, context_dim = 16, embedding_dim = 16}]',
             "experiment.samples=[12]", 'solver.solve="sequential"', "solver.val_convergence_trials=0"]


def cvfp_by_hand(record: dict[str, Any]) -> dict[str, int]:
    """The module docstring's rules for the `cvfp` solver with a sequential iteration 0 and sequential solves
    (n evaluations a rollout, n a pass), C = 3840 and T = 2304 + 2·16·256 (the bytes tokenizer's V)."""
    c, t = 3840, 2304 + 2 * 16 * 256
    n, n_val, epochs = record["train_tokens"], record["val_tokens"], record["epochs_run"]
    phase1 = 3 * c * (record["phase1_iterations"] - 1) * n + c * n
    phase2 = epochs * (n - 1) * (3 * t + c)
    return {"phase1": phase1, "solve": c * n, "phase2": phase2, "eval": c * n_val + epochs * (n_val - 1) * (c + t),
            "total": phase1 + c * n + phase2}


def test_cvfp_records_every_phases_flops_and_a_resumed_unit_the_same(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def run(folder: Path, resume: bool = False) -> dict[str, Any]:
        folder.mkdir(exist_ok=True)
        return execute(write_tiny(folder), ONE_MODEL, folder / "runs", resume, "none", load_plugins())["results"][0]

    whole = run(tmp_path / "whole")
    assert whole["flops"] == cvfp_by_hand(whole) and whole["train_flops"] == whole["flops"]["total"]
    assert whole["epochs_run"] > 1 and set(whole["seconds"]) == {"phase1", "solve", "phase2", "unit"}

    import newllm_kit_plugins.cvfp.recipe as cvfp_recipe

    train_phase2 = cvfp_recipe.train_phase2

    def killed_after_one_epoch(*args: Any, on_epoch_end: Any, **kwargs: Any) -> Any:
        def end(state: Any) -> None:
            on_epoch_end(state)
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint

        return train_phase2(*args, on_epoch_end=end, **kwargs)

    monkeypatch.setattr(cvfp_recipe, "train_phase2", killed_after_one_epoch)
    with pytest.raises(RunInterrupted):
        run(tmp_path / "cut")
    monkeypatch.undo()
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed["epochs_run"] == whole["epochs_run"]
    assert (resumed["flops"], resumed["train_flops"]) == (whole["flops"], whole["train_flops"])


def test_a_record_without_flops_reads_as_none_and_prints_as_a_dash() -> None:
    assert train_flops({"flops": {"total": 3.2e12}}) == 3.2e12 and train_flops({"train_flops": 7}) == 7
    assert train_flops({}) is None and train_flops({"flops": {"total": None}}) is None
    assert [flops_text(v) for v in (None, 512, 3_214_000_000_000, 1.0e9)] == ["—", "512", "3.21e12", "1.00e9"]
