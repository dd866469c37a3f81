"""A plugin that registers a metric name `good` already uses, then a metric of its own."""

from typing import Any

from newllm_kit import hookimpl


class Metric:
    direction, unit = "max", "1"

    def __init__(self, settings: Any) -> None:
        self.name = "metric"

    def compute(self, outputs: Any) -> float:
        return 3.0


@hookimpl
def register_metrics(register: Any) -> None:
    register("constant", Metric)
    register("also-here", Metric)
