"""A plugin that registers a metric name another plugin already uses ("constant")."""

from typing import Any

from newllm_kit import hookimpl


class AlsoConstant:
    name, direction, unit = "constant", "max", "1"

    def __init__(self, settings: Any) -> None:
        pass

    def compute(self, outputs: Any) -> float:
        return 2.0


@hookimpl
def register_metrics(register: Any) -> None:
    register("constant", AlsoConstant)
