"""One line per validation error: the key a user wrote, what is allowed (a field's whole range,
not only the bound crossed), and for an unknown key the closest valid one or the valid keys.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

# Location parts pydantic adds for the members of a union (`int | "auto"`): not keys a user wrote.
_UNION_MEMBER = re.compile(r"^(int|float|str|bool|none|constrained-\w+|.*\[.*\])$")


def _key_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_MEMBER.match(p)))


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _allowed_range(model: Any, loc: tuple[Any, ...]) -> str | None:
    """The range of a field at `loc` that declares both a lower and an upper bound, as in
    "between 1 and 1,024", so an error states what is allowed and not only the bound crossed."""
    info = None
    for part in loc:
        if isinstance(part, int):  # an element of a list of models: `models.0.…`
            model = (getattr(model, "__args__", None) or (None,))[0]
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    if info is None:
        return None
    limits = {name: getattr(m, name) for m in info.metadata for name in _SYMBOLS
              if getattr(m, name, None) is not None}
    low = next((name for name in ("ge", "gt") if name in limits), None)
    high = next((name for name in ("le", "lt") if name in limits), None)
    if low is None or high is None:
        return None
    if (low, high) == ("ge", "le"):
        return f"between {limits['ge']:,} and {limits['le']:,}"
    return f"{_SYMBOLS[low]} {limits[low]:,} and {_SYMBOLS[high]} {limits[high]:,}"


# Types strict validation refuses to convert into (TOML values are typed): what to write instead.
_TYPE_ERRORS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                "string_type": "a string"}


def _type_message(error_type: str, value: Any) -> str | None:
    """What is wrong with a TOML value of the wrong type, in the user's terms: quotes make text, never a
    number or a boolean, and true/false is not a number. None: pydantic's own words will do."""
    wanted = _TYPE_ERRORS.get(error_type)
    if wanted is None:
        return None
    if isinstance(value, str):
        number = error_type in ("int_type", "float_type") and _is_number(value, error_type)
        advice = (" (true or false, without quotes)" if error_type == "bool_type"
                  else f" (write {value.strip()} without quotes)" if number else "")
        return f"must be {wanted}, not text{advice}"
    if isinstance(value, bool):
        return f"must be {wanted}, not true/false"
    if isinstance(value, float) and error_type == "int_type":
        return "must be a whole number, without a decimal point"
    return None


def _is_number(text: str, error_type: str) -> bool:
    try:
        (int if error_type == "int_type" else float)(text.strip())
    except ValueError:
        return False
    return len(text) <= 40


def format_error(path: Path, error: ValidationError, prefix: str, valid: list[str],
                  model: type[BaseModel]) -> ConfigError:
    errors = error.errors()
    first = errors[0]
    loc = _key_loc(first["loc"])
    same_key = [e for e in errors if _key_loc(e["loc"]) == loc]  # one per union member
    key = ".".join(str(p) for p in (prefix, *loc) if str(p) != "")
    others = len(errors) - len(same_key)
    more = f" (+{others} more)" if others else ""
    if first["type"] == "extra_forbidden":
        leaf = str(first["loc"][-1])
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
        return ConfigError(f"{path}: {key}: unknown key{hint}{more}")
    value = first.get("input")
    text = repr(value)
    shown = f" (got {text if len(text) <= 80 else text[:77] + '…'})" if not isinstance(value, dict) else ""
    message = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_key))
    allowed = _allowed_range(model, loc) if first["type"] in _BOUND_ERRORS else None
    if allowed is not None:
        message = f"must be {allowed}"
    if len(same_key) == 1:
        message = _type_message(first["type"], value) or message
    return ConfigError(f"{path}: {key}: {message}{shown}{more}")


def valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that a validation error location points into."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or str(part) not in fields:
            break
        annotation = fields[str(part)].annotation
        current = getattr(annotation, "__args__", (annotation,))[0] if str(part) == "models" else annotation
    return list(getattr(current, "model_fields", {}).keys())
