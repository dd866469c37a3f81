"""A plugin whose registration hook raises."""

from typing import Any

from newllm_kit import hookimpl


@hookimpl
def register_metrics(register: Any) -> None:
    register("half", object)
    raise RuntimeError("config file ~/.half not found")
