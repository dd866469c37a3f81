"""The docs mirror the code: every hook documented, every documented signature the contracts' own,
README commands real."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from newllm_kit_plugins.cvfp import contract as cvfp_contract
from newllm_kit_plugins.lm import recipe as lm
from typing_extensions import get_protocol_members

from newllm_kit import hookspecs, protocols
from newllm_kit.plugins import load_plugins, registration_hooks

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-plugins.md"
# Every contract a plugin implements or a recipe is handed: the guide's reference has a table for each.
CONTRACTS: list[type] = [
    *protocols.PROTOCOLS.values(), protocols.Placement, protocols.MemoryPolicy, protocols.Collectives,
    protocols.LanguageModel, protocols.Tokenizer, protocols.Progress,
    protocols.Checkpointer, protocols.Saved, protocols.EvalOutputs, protocols.UnitData, protocols.UnitContext,
    protocols.Column, protocols.RecipeResult, protocols.Kept, protocols.Decoder, protocols.UnitJob,
    protocols.LaunchRequest, protocols.TrackedRun,
    lm.AutoregressiveModel, cvfp_contract.CVFPModel,
    cvfp_contract.ContextBlock, cvfp_contract.Solver, cvfp_contract.Phase1Report, cvfp_contract.SolveResult,
]
# What each register_* hook's factory returns: the core's kinds, and the kind the cvfp recipe declares.
HOOK_CONTRACTS = {hook: protocols.PROTOCOLS.get(kind, cvfp_contract.Solver)
                  for hook, kind in registration_hooks(load_plugins().manager).items()}
# The recipes' model contracts may leave the members they share with LanguageModel to its table, and
# Runner all of its members to the tables of the three protocols it combines.
EXTENDS: dict[type, tuple[type, ...]] = {
    lm.AutoregressiveModel: (protocols.LanguageModel,), cvfp_contract.CVFPModel: (protocols.LanguageModel,),
    protocols.Runner: (protocols.Placement, protocols.MemoryPolicy, protocols.Collectives)}
SPAN = re.compile(r"`((?:[^`\\]|\\.)+)`")
CALL = re.compile(r"(?P<name>[A-Za-z_]\w*)\((?P<params>[^()]*)\)(?: -> (?P<returns>.+))?")
ATTRIBUTE = re.compile(r"(?P<name>[A-Za-z_]\w*): (?P<type>.+)")


class Call(NamedTuple):
    name: str
    params: list[str]  # names only: no defaults, no types
    returns: str | None


def parse_call(text: str) -> Call | None:
    match = CALL.fullmatch(text)
    if match is None:
        return None
    params = [p.split("=")[0].strip() for p in match.group("params").split(",") if p.strip()]
    return Call(match.group("name"), params, match.group("returns"))


def members(contract: type) -> list[str]:
    """A protocol's members, or a dataclass's fields and public methods."""
    if dataclasses.is_dataclass(contract):
        return [f.name for f in dataclasses.fields(contract)] + [
            name for name, value in vars(contract).items() if inspect.isfunction(value) and not name.startswith("_")]
    return sorted(get_protocol_members(contract))


def method(contract: type, name: str) -> inspect.Signature | None:
    for cls in contract.__mro__:
        value = vars(cls).get(name)
        if inspect.isfunction(value):
            return inspect.signature(value)
    return None


def annotation(contract: type, name: str) -> str | None:
    """The declared type of an attribute member (a property's return type), as written in the code."""
    for cls in contract.__mro__:
        if name in vars(cls).get("__annotations__", {}):
            return str(vars(cls)["__annotations__"][name])
        value = vars(cls).get(name)
        if isinstance(value, property) and value.fget is not None:
            return str(inspect.signature(value.fget).return_annotation)
    return None


def rendered(contract: type, name: str) -> str:
    """A member as the docs write it: `name(params) -> returns` (no self, no parameter types; defaults
    kept) or `name: type`."""
    signature = method(contract, name)
    if signature is None:
        return f"{name}: {annotation(contract, name)}"
    params = []
    for p in list(signature.parameters.values())[1:]:
        star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        params.append(star + p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    returns = "" if signature.return_annotation is signature.empty else f" -> {signature.return_annotation}"
    return f"{name}({', '.join(params)}){returns}"


def code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced code blocks, with the tables' escaped pipes undone."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [span.replace("\\|", "|") for span in SPAN.findall(prose)]


def reference_tables(text: str) -> dict[str, list[str]]:
    """The guide's contract reference: under each heading `#### `module.Contract``, a table whose first
    cells are the contract's members as code spans."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if heading := re.fullmatch(r"#### `([\w.]+)`", line):
            current = tables.setdefault(heading.group(1), [])
        elif current is not None and line.startswith("| `"):
            current.append(code_spans(line)[0])
        elif line.startswith("#"):
            current = None
    return tables


def stale_signatures(text: str) -> list[str]:
    """Code spans that write a contract member (`load(vocab_size, dim, generator)`, `size() -> int`,
    `fingerprint: str`) as no contract declares it. A call must name the parameters of a contract's
    member of that name, and its return type where written; an attribute must have its declared type.
    Spans naming no contract member (`token_span(model, ids, start, stop)`) are not checked."""
    stale = []
    for span in code_spans(text):
        call, attribute = parse_call(span), ATTRIBUTE.fullmatch(span)
        if call is not None:
            declared = [rendered(c, call.name) for c in CONTRACTS
                        if call.name in members(c) and method(c, call.name) is not None]
            fits = any(d is not None and d.params == call.params and call.returns in (None, d.returns)
                       for d in map(parse_call, declared))
        elif attribute is not None:
            declared = [rendered(c, attribute["name"]) for c in CONTRACTS
                        if attribute["name"] in members(c) and method(c, attribute["name"]) is None]
            fits = span in declared
        else:
            continue
        if declared and not fits:
            stale.append(f"`{span}`: declared {' or '.join(f'`{d}`' for d in declared)}")
    return stale


def hook_specs() -> dict[str, Any]:
    """Every hookspec: the core's, and the kinds the built-in plugins declare (the cvfp recipe's solvers)."""
    manager = load_plugins().manager
    return {name: caller.spec.function for name, caller in vars(manager.hook).items()
            if caller.spec is not None and name.startswith("register_")}


def test_the_core_and_the_built_in_plugins_declare_these_hooks() -> None:
    core = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")}
    assert set(hook_specs()) == core | {"register_solvers"}
    assert "register_solvers" not in core


def test_every_hook_has_a_docstring_with_an_example() -> None:
    for name, function in hook_specs().items():
        assert "Example" in (function.__doc__ or ""), name


def test_every_hook_is_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "writing-plugins.md").read_text()
    for name in hook_specs():
        assert f"`{name}(" in guide, name


def test_readme_opens_with_install_and_test_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].endswith("newllm-kit run experiments/quickstart.toml")
    assert block[1] == "python -m pytest"
    assert (ROOT / "experiments" / "quickstart.toml").exists()


def test_ci_runs_the_readme_test_command() -> None:
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_changelog_records_this_version() -> None:
    from newllm_kit import __version__

    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_readme_says_up_front_how_to_get_a_cpu_or_cuda_torch() -> None:
    top = "\n".join((ROOT / "README.md").read_text().splitlines()[:35])
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in top
    assert "CUDA" in top


def test_docs_spell_the_gpt2_location_key_one_way() -> None:
    """`name_or_path` everywhere; `path` is only an alias, so the docs never teach it as the key."""
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "experiments").glob("*.toml")),
             *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    for text in texts:
        assert "tokenizer.path" not in text and "embedding.path" not in text
    assert "tokenizer.name_or_path" in texts[0]


def test_the_guide_documents_every_contract_member_as_declared() -> None:
    """The contract reference of docs/writing-plugins.md against the code: every member, with its parameter
    names and defaults and its return or attribute type, and nothing the contract lacks."""
    tables = reference_tables(GUIDE.read_text())
    for contract in CONTRACTS:
        path = f"{contract.__module__}.{contract.__qualname__}"
        assert path in tables, f"docs/writing-plugins.md has no reference table for {path}"
        documented = {re.split(r"[(:]", span)[0]: span for span in tables.pop(path)}
        declared = set(members(contract))
        own = declared - {name for base in EXTENDS.get(contract, ()) for name in members(base)}
        assert set(documented) <= declared, f"{path} has no {sorted(set(documented) - declared)}"
        assert own <= set(documented), f"{path}: {sorted(own - set(documented))} undocumented"
        for name, span in documented.items():
            declared_as = rendered(contract, name)
            assert span == declared_as, f"{path}: documented `{span}`, declared `{declared_as}`"
    for path in tables:  # a contract moved or renamed without its table
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"docs/writing-plugins.md documents a missing {path}"


@pytest.mark.parametrize("source", ["docs/writing-plugins.md", "newllm_kit/hookspecs.py", "newllm_kit/protocols.py"])
def test_every_signature_in_the_prose_is_a_declared_one(source: str) -> None:
    assert stale_signatures((ROOT / source).read_text()) == []


def test_each_hook_names_its_contract_and_every_member() -> None:
    """A hook's docstring says what its factory returns: the contract by name, and each of its members
    (except the runner's many, left to its protocol)."""
    for hook, contract in HOOK_CONTRACTS.items():
        doc = hook_specs()[hook].__doc__ or ""
        assert f"`{contract.__name__}`" in doc, hook
        if contract is not protocols.Runner:
            written = {re.split(r"[(:]", span)[0] for span in code_spans(doc)}
            assert set(members(contract)) <= written, f"{hook} leaves out {sorted(set(members(contract)) - written)}"


def test_a_drifted_signature_is_caught() -> None:
    """The review's examples of docs that had drifted from the protocols, beside correct ones."""
    drifted = ["load(vocab_size, dim, seed)", "size() -> int | None", "documents(rows) -> list[str]", "freeze: bool",
               "fingerprint: int", "hidden(ids)"]
    correct = ["load(vocab_size, dim, generator) -> torch.Tensor", "load(train_texts, cache_dir)", "size() -> int",
               "fingerprint: str", "fingerprint() -> str", "solve(model, ids, runner, out=None)",
               "token_span(model, ids, start, stop)"]
    found = stale_signatures(" ".join(f"`{span}`" for span in drifted + correct))
    assert [line.split("`")[1] for line in found] == [s for s in drifted if s != "freeze: bool"]
