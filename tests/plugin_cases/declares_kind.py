"""A plugin that declares a kind of its own, `widget`; uses_kind.py registers one."""

from typing import Any

from newllm_kit import hookspec


@hookspec
def register_widgets(register: Any) -> None:
    """Register widgets.

    Example::

        @hookimpl
        def register_widgets(register):
            register("knob", Knob)
    """
