"""A plugin whose registration hook raises KeyboardInterrupt itself, with no signal behind it."""

from typing import Any

from newllm_kit import hookimpl


@hookimpl
def register_metrics(register: Any) -> None:
    raise KeyboardInterrupt
