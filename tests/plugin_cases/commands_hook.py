"""A plugin whose `register_commands` prints and then raises KeyboardInterrupt itself (no Ctrl-C)."""

from typing import Any

from newllm_kit import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    print("commands hook: registering")
    raise KeyboardInterrupt
