"""A plugin that declares a kind the core already has."""

from typing import Any

from newllm_kit import hookspec


@hookspec
def register_metrics(register: Any) -> None:
    """A second declaration of the core's metrics."""
