"""A plugin whose components leave the way a script would: `sys.exit(0)` in one metric factory, a
KeyboardInterrupt raised by the plugin itself (no Ctrl-C) in the other, and `sys.exit(3)` when its
architecture builds a model."""

import sys
from typing import Any

from newllm_kit import hookimpl


def leave(settings: Any) -> Any:
    sys.exit(0)


def interrupt(settings: Any) -> Any:
    raise KeyboardInterrupt


class QuitsWhenBuilt:
    default_recipe, embedding_dim = "lm", 8

    def __init__(self, settings: Any) -> None:
        pass

    def build(self, vocab_size: int) -> Any:
        sys.exit(3)


@hookimpl
def register_architectures(register: Any) -> None:
    register("quits-when-built", QuitsWhenBuilt)


@hookimpl
def register_metrics(register: Any) -> None:
    register("leaves", leave)
    register("interrupts", interrupt)
