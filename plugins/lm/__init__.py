"""The `lm` recipe (ordinary next-token training) and the baselines it trains.

Entry-point modules: `recipe` (entry point `lm`: recipe `lm`), `transformer` and `gru` (the
architectures of those names). `contract` holds `AutoregressiveModel`, re-exported here for third parties.
"""

from .contract import AutoregressiveModel

__all__ = ["AutoregressiveModel"]
