"""A plugin whose factories return objects missing members their protocols require."""

from typing import Any

import torch
from torch import nn

from newllm_kit import hookimpl


class Block(nn.Module):
    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
        return [context + projected]


class HollowModel(nn.Module):
    """Everything a CVFP model needs (`protocols.LanguageModel`, `cvfp_contract.CVFPModel`) but `param_counts`."""

    context_dim = token_width = embedding_dim = 4
    layer_widths = (4,)

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, 4)
        self.context_block, self.token_block = Block(), Block()

    def token_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def token_states(self, layer_contexts: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return layer_contexts[-1] + tokens

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding.weight, None

    def set_embedding(self, weight: torch.Tensor, freeze: bool) -> None:
        self.embedding.weight.data.copy_(weight)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"phase1": [], "phase2": list(self.embedding.parameters())}


class HollowArchitecture:
    embedding_dim = 4
    default_recipe = "cvfp"

    def __init__(self, settings: Any) -> None:
        pass

    def build(self, vocab_size: int) -> nn.Module:
        return HollowModel(vocab_size)


class FitOnly:
    """A solver without `solve`."""

    def __init__(self, settings: Any) -> None:
        pass

    def fit(self, model: Any, tokens: Any, runner: Any, progress: Any) -> Any:
        raise AssertionError("never reached: the check comes first")


class Lazy:
    """A runner class that only knows its name."""

    name = "lazy"

    def __init__(self, settings: Any) -> None:
        pass


def broken_factory(settings: Any) -> Any:
    raise ValueError("cannot parse the settings")


@hookimpl
def register_architectures(register: Any) -> None:
    register("hollow", HollowArchitecture)


@hookimpl
def register_solvers(register: Any) -> None:
    register("fit-only", FitOnly)


@hookimpl
def register_runners(register: Any) -> None:
    register("lazy", Lazy)


@hookimpl
def register_data_sources(register: Any) -> None:
    register("broken", broken_factory)
