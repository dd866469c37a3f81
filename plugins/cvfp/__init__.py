"""CVFP: the model, its two-phase recipe and everything the recipe runs, read top to bottom.

recipe → phases (phase1 solvers: phase1, gradual_decrease, split_phase1; phase2) → the pieces they
use (jacobi_pass, frozen_solve, context_store, phase1_contexts, diagnostics, spans) → model and
contract; a module never imports one above it (tests/test_layers.py). Entry-point modules: `model`
(entry point `cvfp`: architecture `cvfp`, `CVFPArchitecture`), `recipe` (`cvfp_recipe`: recipe `cvfp`,
`CVFPRecipe`, declares the `solver` kind), `phase1` (`fixed_point`: Phase-1 solver `cvfp`,
`CVFPPhase1Solver`), `gradual_decrease` (`gradual_decrease`: Phase-1 solver `gradual-decrease`).
The contract third-party solvers and CVFP-shaped models implement is re-exported here.
"""

from .contract import ContextBlock, CVFPModel, Phase1Report, Solver, SolveResult
from .spans import token_rows, token_span

__all__ = ["CVFPModel", "ContextBlock", "Phase1Report", "SolveResult", "Solver", "token_rows", "token_span"]
