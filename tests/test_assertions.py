"""The suite's own rule: every test checks something exact. A test whose asserts are all orderings,
ranges or truthiness passes for many wrong implementations, often for the function under test replaced
by a constant; the few left are bounds on behaviour, each listed here with why it is enough."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXACT_CALLS = {"approx", "isclose", "isnan", "assert_close", "allclose", "equal", "array_equal", "assert_allclose",
               "assert_array_equal", "raises", "warns", "startswith", "endswith", "is_file", "exists", "is_dir"}
EXACT_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)
BOUNDS = {  # test -> why a bound, a truth value or "does not raise" is the behaviour
    "tests/test_allocator.py::test_freed_chunks_leave_the_process": "freed memory goes back: a bound on growth",
    "tests/test_claims.py::test_a_claim_file_left_empty_by_a_dead_creator_is_taken_over":
        "taking over does not raise and names no holder; the refusals are the neighbouring tests",
    "tests/test_context_store.py::test_what_counts_as_out_of_memory": "a predicate, checked true and false",
    "tests/test_cuda.py::test_the_fake_overrides_every_call_of_the_backend": "a subset of names",
    "tests/test_damaged_state.py::test_an_undamaged_lm_checkpoint_fits": "accepted; each damage refused beside it",
    "tests/test_damaged_state.py::test_an_undamaged_cvfp_checkpoint_fits": "accepted; each damage refused beside it",
    "tests/test_ddp_timings.py::test_peak_rss_is_this_process_alone":
        "a child's peak excludes its parent's 400 MB: bounds on either side",
    "tests/test_layers.py::test_no_module_imports_one_above_it": "an empty set of upward imports",
    "tests/test_layers.py::test_no_import_cycle": "no module reaches itself",
    "tests/test_layers.py::test_no_import_cycle_in_the_core_or_the_built_ins": "no module reaches itself",
    "tests/test_recipe_outputs.py::test_honest_and_empty_outputs_pass": "accepted; each fault refused beside it",
    "tests/test_skeleton.py::test_valid_names": "accepted; the invalid names are refused beside it",
    "tests/builtin/test_cvfp.py::test_every_setting_is_documented": "every field has a description",
    "tests/builtin/test_fixed_point.py::test_no_whole_stream_token_inputs_exist":
        "a bound on the rows computed at once",
}


def _exact(node: ast.AST) -> bool:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Compare) and any(isinstance(op, EXACT_OPS) for op in inner.ops):
            return True
        if isinstance(inner, ast.Call):
            name = inner.func.attr if isinstance(inner.func, ast.Attribute) else getattr(inner.func, "id", "")
            if name in EXACT_CALLS:
                return True
    return False


def _only_bounds(function: ast.FunctionDef) -> bool:
    """No exact comparison anywhere in the test: not in an assert, a `with pytest.raises`, or a call."""
    for node in ast.walk(function):
        if isinstance(node, ast.Assert) and _exact(node.test):
            return False
        if isinstance(node, ast.With) and any(_exact(item.context_expr) for item in node.items):
            return False
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _exact(node.value):
            return False
    return True


def suite_files() -> list[tuple[str, str]]:
    """(name, source) of every test module, the plugin templates' included (their placeholders filled)."""
    templates = ROOT / "plugins" / "templates"
    paths = [*sorted((ROOT / "tests").rglob("test_*.py")), *sorted(templates.rglob("test_*.tmpl"))]
    return [(str(path.relative_to(ROOT)),
             path.read_text(encoding="utf-8").replace("${package}", "package").replace("${name}", "name"))
            for path in paths]


def test_every_test_checks_an_exact_value_or_is_a_listed_bound() -> None:
    found = {f"{name}::{node.name}" for name, source in suite_files() for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _only_bounds(node)}
    assert sorted(found - set(BOUNDS)) == [], "compare these with an exact, independently computed value"
    assert sorted(set(BOUNDS) - found) == [], "these now check exact values: take them off BOUNDS"
