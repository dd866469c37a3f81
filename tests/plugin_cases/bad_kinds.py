"""A plugin that declares a hook that is not a kind, and one the core already has."""

from typing import Any

from newllm_kit import hookspec


@hookspec
def widgets(register: Any) -> None:
    """Not `register_<kind>s`."""
