"""Example third-party plugin: architectures `ngram-mlp` (lm recipe) and `tanh-rnn` (cvfp recipe), and
the metric `bits_per_token`.

Uses only the public plugin API: `newllm_kit.hookimpl`, the `register` callback, the contracts in
`newllm_kit.protocols` and the recipes' model contracts (`newllm_kit_plugins.lm.AutoregressiveModel`,
`newllm_kit_plugins.cvfp.contract.CVFPModel`).
"""

from __future__ import annotations

import math
from typing import Any

from newllm_kit import hookimpl
from newllm_kit.protocols import EvalOutputs

from .ngram_mlp import NGramMLPArchitecture, NGramMLPSettings
from .tanh_rnn import TanhRNNArchitecture, TanhRNNSettings


class BitsPerToken:
    """Mean negative log2-likelihood per scored validation position: the NLL in bits, not nats."""

    name, direction, unit = "bits_per_token", "min", "bits"

    def __init__(self, settings: None) -> None:
        pass

    def compute(self, outputs: EvalOutputs) -> float:
        return outputs.nll_sum / max(outputs.count, 1) / math.log(2)


@hookimpl
def register_architectures(register: Any) -> None:
    register("ngram-mlp", NGramMLPArchitecture, settings=NGramMLPSettings,
             description="neural n-gram model: an MLP over the last tokens' embeddings (lm recipe; example plugin)")
    register("tanh-rnn", TanhRNNArchitecture, settings=TanhRNNSettings,
             description="one-layer tanh recurrent context block (cvfp recipe; example plugin)")


@hookimpl
def register_metrics(register: Any) -> None:
    register("bits_per_token", BitsPerToken, description="mean negative log2-likelihood per token")
