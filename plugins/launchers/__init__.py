"""Launchers: where the units of a grid run.

Entry-point modules: `sequential` (entry point `sequential_launcher`: one unit after another in this
process, the default), `pool` (`pool_launcher`: local worker processes, one unit per GPU) and `slurm`
(`slurm_launcher`: a Slurm job array through submitit). The pool and Slurm jobs each run
`newllm-kit run RUN_DIR --unit ID`, which claims its unit in the run directory.
"""
