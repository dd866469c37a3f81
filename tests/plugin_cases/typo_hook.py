"""A plugin with a misspelt hook name: register_metric instead of register_metrics."""

from typing import Any

from newllm_kit import hookimpl


@hookimpl
def register_metric(register: Any) -> None:
    register("never", object)
