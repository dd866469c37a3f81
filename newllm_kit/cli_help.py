"""How the command line's help and usage read: arguments named as click names them (`FILE`,
`[SOURCE]...`) with no type column, flags with no placeholder, and an unknown command answered
in one line with a did-you-mean. Every command and group of the CLI uses these classes.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .cli_errors import did_you_mean
from .errors import UserError


class _Argument(TyperArgument):
    """Help names an argument as click does (`FILE`, `[SOURCE]...`) instead of Typer's `{FILE}`,
    `[SOURCE...]...` and a type column (`<path>`, `<list[Path]>`) that repeats what the help says."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return [name + ("..." if self.nargs != 1 else "")]

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _Option(TyperOption):
    """A flag takes no value, so help shows no `<bool>` placeholder after it."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None if self.is_flag else super().display_type_rich(ctx)


def _plain_help(params: list[Any]) -> list[Any]:
    """Typer builds the parameters; they are given the help above before any help is shown."""
    plain: dict[type, type] = {TyperArgument: _Argument, TyperOption: _Option}
    for param in params:
        param.__class__ = plain.get(type(param), type(param))
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_help(super().get_params(ctx))


class Commands(TyperGroup):
    """Unknown command names fail like unknown options: one line with a did-you-mean."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_help(super().get_params(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            known = self.list_commands(ctx)
            close = get_close_matches(name, known)
            raise UserError(f"no such command {name}" + (did_you_mean(close) if close else
                                                          f"; the commands are {', '.join(known)}"))
        return super().resolve_command(ctx, args)
