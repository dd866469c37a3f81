"""Runners: where and how a unit runs.

Entry-point modules: `local` (entry point `local_runner`: `cpu`, `gpu`, `auto` in one process) and
`ddp` (`ddp_runner`: one process per device under torchrun). Each runner implements placement, memory
policy and collectives together (`newllm_kit.protocols.Runner`); their CUDA calls go through the core's
backend, `newllm_kit.cuda`.
"""
