"""A plugin that prints while it is imported, while it registers, while its factory builds, and while its
architecture builds a model."""

from typing import Any

from newllm_kit import hookimpl

print("printing plugin: imported")


class Chatty:
    name, direction, unit = "chatty", "max", "1"

    def __init__(self, settings: Any) -> None:
        print("printing plugin: building chatty")

    def compute(self, outputs: Any) -> float:
        return 1.0


class ChattyArchitecture:
    default_recipe, embedding_dim = "lm", 8

    def __init__(self, settings: Any) -> None:
        pass

    def build(self, vocab_size: int) -> Any:
        print("printing plugin: building a model")
        raise RuntimeError("needs real tensors")  # checked when a run builds it


@hookimpl
def register_architectures(register: Any) -> None:
    register("chatty-arch", ChattyArchitecture)


@hookimpl
def register_metrics(register: Any) -> None:
    print("printing plugin: registering")
    register("chatty", Chatty)
