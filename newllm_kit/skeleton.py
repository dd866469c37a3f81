"""`newllm-kit plugins new`: write a ready-to-install plugin package with one working component.

The files come from the built-in plugins' package data, `plugins/templates/plugin/` (installed as
`newllm_kit_plugins/templates/plugin/`, beside the components they imitate): the shared ones at its
top, and the component, its test and the TOML that selects it under `kinds/<kind>/`. Placeholders are
`string.Template` fields (`${name}`, `${package}`) because braces are everywhere in Python and TOML.
"""

from __future__ import annotations

import difflib
import importlib.util
import keyword
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from .errors import UserError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
MAX_NAME = 32  # generated lines that hold the name stay within 120 columns up to this length
TEMPLATES = resources.files("newllm_kit_plugins") / "templates" / "plugin"


@dataclass(frozen=True)
class Kind:
    """What the README and pyproject say about the component a kind's template writes (its about.toml)."""

    summary: str
    contract: str
    built_ins: str  # the built-in plugins its tests load, comma-separated (the one declaring the kind)


# One template per kind in its own folder, the cvfp recipe's `solver` among them (about.toml says what it is).
KINDS = tuple(sorted(entry.name for entry in (TEMPLATES / "kinds").iterdir() if entry.is_dir()))


# (template, path in the package); `kind/` stands for the chosen kind's folder, `kinds/<kind>/`.
FILES = (
    ("pyproject.toml", "pyproject.toml"),
    ("README.md", "README.md"),
    ("__init__.py", "src/${package}/__init__.py"),
    ("kind/plugin.py", "src/${package}/plugin.py"),
    ("conftest.py", "tests/conftest.py"),
    ("kind/test_plugin.py", "tests/test_plugin.py"),
)


def package_name(name: str) -> str:
    """The import name of distribution `name`: `my-plugin` → `my_plugin`."""
    return name.replace("-", "_")


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"--kind: expected one of {', '.join(KINDS)} (got {kind!r}){hint}")
    about = tomllib.loads((TEMPLATES / "kinds" / kind / "about.toml").read_text(encoding="utf-8"))
    return Kind(about["summary"], about["contract"], about["built_ins"])


def check_name(name: str, taken: Collection[str] = ()) -> None:
    """Refuse a name that is no distribution name, no import name, or one already in use.

    `taken`: names of installed plugins and components of the kind; a second `cvfp` would be
    disabled as a duplicate the moment it is installed.
    """
    package = package_name(name)
    if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(package) or len(name) > MAX_NAME:
        raise UserError(f"plugin name {name!r}: use up to {MAX_NAME} lowercase letters and digits, starting with a "
                        f"letter, with single '-' or '_' between them (e.g. my-plugin)")
    if name in taken:
        raise UserError(f"plugin name {name!r} is taken by an installed plugin or component; choose another name")
    if importlib.util.find_spec(package) is not None:
        raise UserError(f"plugin name {name!r}: a module {package!r} is already importable here, and the new "
                        f"package would shadow it or be shadowed; choose another name")


def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{target} exists and is not a folder; choose another name or --dir")
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not empty; choose another name or --dir")
    if target.parent.exists() and not target.parent.is_dir():
        raise UserError(f"--dir {target.parent} is a file, not a folder")


def _template(relative: str, kind: str) -> Template:
    folder = TEMPLATES / "kinds" / kind if relative.startswith("kind/") else TEMPLATES
    return Template((folder / (relative.removeprefix("kind/") + ".tmpl")).read_text(encoding="utf-8"))


def write_plugin(name: str, kind: str, parent: Path, taken: Collection[str] = ()) -> list[Path]:
    """Write the package `parent/name` (created, or empty) and return the files written, in order.

    Nothing is written before every check has passed, and nothing outside `parent/name`; a file
    is never overwritten.
    """
    about = check_kind(kind)
    check_name(name, taken)
    target = parent / name
    _check_target(target)
    fields = {"name": name, "package": package_name(name), "kind_label": kind.replace("_", " "),
              "summary": about.summary, "contract": about.contract, "built_ins": about.built_ins}
    fields["usage"] = _template("kind/usage.toml", kind).substitute(fields).rstrip("\n")
    texts = [(target / Template(path).substitute(fields), _template(template, kind).substitute(fields))
             for template, path in FILES]
    for path, text in texts:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
    return [path for path, _ in texts]
