"""A plugin with a misspelt hook name: register_solver instead of register_solvers."""

from typing import Any

from newllm_kit import hookimpl


@hookimpl
def register_solver(register: Any) -> None:
    register("never", object)
