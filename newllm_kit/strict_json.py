"""JSON as the standard defines it, for every file and `--json` document the kit writes.

Python's `json` writes NaN and infinity as the literals `NaN` and `Infinity`, which no strict
parser (browsers, jq, most languages) reads. A number that is not finite (a metric with nothing to
measure, a perplexity that overflowed) is written as null instead, and readers take null as
"no number".
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float (also inside dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = None, sort_keys: bool = True) -> str:
    """Strict JSON of `value`; `allow_nan=False` makes a non-finite number the conversion misses (a
    numpy scalar, say) fail loudly instead of writing a literal no parser reads."""
    return json.dumps(finite_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
