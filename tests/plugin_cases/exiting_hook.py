"""A plugin whose registration hook calls sys.exit (it must not take the CLI down)."""

import sys
from typing import Any

from newllm_kit import hookimpl


class Quits:
    name, direction, unit = "quits", "max", "1"

    def __init__(self, settings: Any) -> None:
        pass

    def compute(self, outputs: Any) -> float:
        return 0.0


@hookimpl
def register_metrics(register: Any) -> None:
    register("quits", Quits)
    sys.exit(4)
