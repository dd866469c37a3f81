"""A plugin whose registration hook raises a BaseException that is not an Exception."""

from typing import Any

from newllm_kit import hookimpl


class Escape(BaseException):
    pass


@hookimpl
def register_metrics(register: Any) -> None:
    raise Escape("escaped the Exception hierarchy")
