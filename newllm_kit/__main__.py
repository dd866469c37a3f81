"""`python -m newllm_kit` (what `torchrun -m newllm_kit` starts on every rank)."""

from .cli import main

main()
