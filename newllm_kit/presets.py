"""Settings with a `preset` key: a named set of values that the file's explicit keys override.

Architectures name their reference sizes this way (`preset = "6L-768"`, `preset = "v2-A"`); the rule
is the same for every one of them, so it is written once here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, model_validator


class PresetSettings(BaseModel):
    """A settings model whose `preset` key fills in the values of `presets[preset]` under the explicit
    keys. Subclasses declare the `preset` field (its allowed names) and the `presets` table."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in cls.presets:
            return {**cls.presets[data["preset"]], **data}
        return data
