"""`NewllmKitForCausalLM`: a kit model whose recipe decodes (CVFP, GRU, …) as a `transformers` model.

`AutoModelForCausalLM.from_pretrained(DIR)` on a folder `newllm-kit export` wrote rebuilds the model
through the kit's plugins from the experiment its `NewllmKitConfig` carries, holds it as the
submodule `kit` (so its weights are the kit's state dict under "kit."), and the recipe's kept
tensors as buffers under "kept.". `forward` reads each row with a fresh `recipe.decoder(model, kept)`,
the computation `newllm-kit sample` runs, so its logits are the kit's. It is for inference and
evaluation: the decoders run without gradients. No remote code: the kit registers these classes
with `transformers` (`newllm_kit.hf_auto`).
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_utils import PreTrainedModel

from .hf_config import NewllmKitConfig
from .protocols import Kept
from .registry import Registry


@cache
def _registry() -> Registry:
    from .plugins import load_plugins

    return load_plugins().registry


def rebuild(config: NewllmKitConfig) -> tuple[nn.Module, Any]:
    """The kit model the config describes (its architecture's fresh weights) and its recipe, built
    through the installed plugins as `newllm_kit.kept_models.load_model` builds them."""
    from .config import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "experiment.toml"
        path.write_text(config.experiment_toml, encoding="utf-8")
        experiment = load_config(path, _registry())
    labels = [label for label, _ in experiment.models]
    if config.label not in labels:
        raise ValueError(f"newllm-kit config: model label {config.label!r} is not one of its experiment's "
                         f"({', '.join(labels)}); export the model again")
    if config.recipe not in experiment.recipes:
        raise ValueError(f"newllm-kit config: recipe {config.recipe!r} is not one of its experiment's; "
                         f"export the model again")
    model = experiment.models[labels.index(config.label)][1].build().build(config.vocab_size)
    return model, experiment.recipes[config.recipe].build()


class NewllmKitForCausalLM(PreTrainedModel, GenerationMixin):
    """A kit model behind the `transformers` causal-LM interface: logits [b, t, V] for input_ids [b, t]."""

    config_class = NewllmKitConfig
    base_model_prefix = "kit"
    main_input_name = "input_ids"
    _can_compile_fullgraph = False

    def __init__(self, config: NewllmKitConfig) -> None:
        super().__init__(config)
        self.kit, self.recipe = rebuild(config)
        self.kept = nn.Module()
        specs = config.kept_tensors or {}
        self.kept_names = sorted(specs)  # buffer kept.t<i> holds kept_names[i]
        for i, name in enumerate(self.kept_names):
            spec = specs[name]
            self.kept.register_buffer(f"t{i}", torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"])))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the architecture initialised its model when it built it, and from_pretrained loads
        every weight."""

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self.kit, "embedding")  # noqa: B009 - every LanguageModel has its table there

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        """The recipe's kept tensors by name, as `Kept.tensors`."""
        return {name: getattr(self.kept, f"t{i}") for i, name in enumerate(self.kept_names)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        """Each row read from its first attended token by a fresh decoder; padded positions get zero
        logits. `attention_mask` must mark one contiguous run per row (left or right padding). With
        `labels`, the mean cross-entropy of each position's logits against the next label (-100: skipped)."""
        kept = Kept(self.kept_tensors(), dict(self.config.record or {}))
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.config.vocab_size, device=input_ids.device)
        for row in range(b):
            start, end = _attended(attention_mask[row] if attention_mask is not None else None, t)
            if end > start:
                logits[row, start:end] = self.recipe.decoder(self.kit, kept).feed(input_ids[row, start:end]).to(
                    logits.device)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(
                logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate passes no cache: each step reads the whole sequence (below)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Every step reads the whole sequence again: the model keeps no cache between calls."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _attended(mask: torch.Tensor | None, length: int) -> tuple[int, int]:
    """[start, end) of a row's attended positions, which must be contiguous."""
    if mask is None:
        return 0, length
    where = mask.nonzero().flatten()
    if where.numel() == 0:
        return 0, 0
    start, end = int(where[0]), int(where[-1]) + 1
    if where.numel() != end - start:
        raise ValueError("attention_mask: a row's attended tokens must be one contiguous run (left or right "
                         "padding); a newllm-kit model reads each row as one stream")
    return start, end
