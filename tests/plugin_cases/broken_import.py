"""A plugin whose import fails, as when a dependency is missing."""

import newllm_kit_missing_dependency  # noqa: F401
