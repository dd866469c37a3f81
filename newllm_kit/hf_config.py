"""`NewllmKitConfig`: the `transformers` configuration of an exported kit model (`model_type` "newllm-kit").

It carries what rebuilds the model without its run: the unit's resolved experiment (TOML text, which
rebuilds the architecture and its recipe through the same plugins), the model's label in it, the
vocabulary size, and the names and shapes of the recipe's kept tensors. Imported only once
`transformers` is (`newllm_kit.hf_auto`), so it costs `import newllm_kit` nothing.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "newllm-kit"


class NewllmKitConfig(PretrainedConfig):
    """An exported kit model; `newllm_kit.hf_model.NewllmKitForCausalLM` builds it from this."""

    model_type = MODEL_TYPE

    experiment_toml: str = ""  # the unit's resolved experiment (its config.toml)
    label: str = ""  # the model's [[models]] label in it
    architecture: str = ""
    recipe: str = ""  # the recipe whose `decoder` reads a stream
    vocab_size: int = 0
    kept_tensors: dict[str, Any] | None = None  # name -> {"shape": [...], "dtype": "float32"}
    record: dict[str, Any] | None = None  # the unit's results record (`Kept.record`)
    unit: str = ""
    weights: str = ""  # best or final
    tie_word_embeddings: bool = False  # a kit model ties its head by sharing the table: nothing for HF to tie
