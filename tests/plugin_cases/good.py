"""A well-behaved plugin: one solver-free metric and one data source."""

from typing import Any

from newllm_kit import hookimpl


class Constant:
    name, direction, unit = "constant", "max", "1"

    def __init__(self, settings: Any) -> None:
        pass

    def compute(self, outputs: Any) -> float:
        return 1.0


@hookimpl
def register_metrics(register: Any) -> None:
    register("constant", Constant, description="always 1")
