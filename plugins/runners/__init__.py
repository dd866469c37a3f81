"""Runners: where and how a unit runs.

Entry-point modules: `local` (entry point `local_runner`: `cpu`, `gpu`, `auto` in one process; owns
the CUDA backend every CUDA call goes through) and `ddp` (`ddp_runner`: one process per device under
torchrun).
"""
