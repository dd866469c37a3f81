"""Two model-free recipes: `unigram` scores the validation stream honestly from training-token counts;
`faulty` returns what its `[faulty] fault` names: a NaN NLL sum, half of the scored positions, more hits
than positions, or nothing evaluated at all ("skip", as the cvfp recipe when it skips Phase 2)."""

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit import hookimpl
from newllm_kit.protocols import EvalOutputs, RecipeResult, UnitContext, UnitData


def unigram_outputs(data: UnitData, seed: int) -> EvalOutputs:
    """Add-one unigram scores of validation positions 1 … n−1."""
    counts = torch.bincount(data.train_ids.long(), minlength=data.vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = data.val_ids[1:].long()
    return EvalOutputs(nll_sum=float(-log_probs[targets].sum()), correct=int((targets == counts.argmax()).sum()),
                       count=targets.numel(), seed=seed)


class UnigramRecipe:
    def __init__(self, settings: None = None) -> None:
        pass

    def train(self, model: Any, data: UnitData, unit: UnitContext) -> RecipeResult:
        return RecipeResult(val=unigram_outputs(data, unit.seed))


class FaultTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fault: Literal["nan", "half", "hits", "skip"] = "nan"


class FaultySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    faulty: FaultTable = Field(default_factory=FaultTable)


class FaultyRecipe:
    def __init__(self, settings: FaultySettings | None = None) -> None:
        self.fault = (settings if settings is not None else FaultySettings()).faulty.fault

    def train(self, model: Any, data: UnitData, unit: UnitContext) -> RecipeResult:
        honest = unigram_outputs(data, unit.seed)
        unit.progress.start("faulty", 1)
        unit.progress.advance("faulty", iteration=1, loss=float("nan"), rate=float("inf"))
        unit.progress.finish("faulty")
        if self.fault == "nan":
            val = EvalOutputs(nll_sum=float("nan"), correct=honest.correct, count=honest.count)
        elif self.fault == "half":
            val = EvalOutputs(nll_sum=honest.nll_sum / 2, correct=honest.correct // 2, count=honest.count // 2)
        elif self.fault == "hits":
            val = EvalOutputs(nll_sum=honest.nll_sum, correct=honest.count + 1, count=honest.count)
        else:
            val = EvalOutputs()
        return RecipeResult(val=val, record={"fault": self.fault, "overflow": float("inf")})


@hookimpl
def register_recipes(register: Any) -> None:
    register("unigram", UnigramRecipe, description="add-one unigram counts")
    register("faulty", FaultyRecipe, settings=FaultySettings, description="returns broken validation sums")
