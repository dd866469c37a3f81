"""A plugin that registers a component of the kind declares_kind.py declares."""

from typing import Any

from newllm_kit import hookimpl


class Knob:
    pass


@hookimpl
def register_widgets(register: Any) -> None:
    register("knob", Knob)
