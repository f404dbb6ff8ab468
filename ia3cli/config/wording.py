"""Recipe validation errors in the user's words: the dotted key, what is wrong, what is accepted, did-you-mean.

pydantic reports locations with union-member and validator tags (``literal['auto']``, ``list[str]``) and one
error per union member; :func:`format_errors` walks each location through the schema instead, so keys that merely
start like a tag (``stride``, ``strict``) are named as keys and a bad value of a union-typed key gives one line
listing every accepted form.
"""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ia3cli.errors import RecipeError


def suggest(key: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


# How errors name the non-literal members of a union-typed key (only the adapter targets are unions); literal
# members name themselves, so a value added to the Literal shows up in the message without a change here.
UNION_MEMBER_WORDS = {"list[str]": "a list of module-name suffixes", "str": "one regex string", "NoneType": "null"}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``Section`` or ``list[Section]``), or ``None``."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _location(loc: tuple[str | int, ...], root: type[BaseModel]) -> tuple[list[str], Any, bool]:
    """Walk an error location through the schema.

    Returns:
        The key path (schema keys, list indices, a trailing unknown key) without pydantic's union-member and
        validator tags such as ``literal['auto']``; the field the path ends in (``None`` for an unknown key);
        whether the location went through a union member.
    """
    model: type[BaseModel] | None = root
    keys: list[str] = []
    field = None
    tagged = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            keys.append(str(part))
        elif model is not None and part in model.model_fields:
            field = model.model_fields[part]
            keys.append(part)
            model = _model_of(field.annotation)
        elif model is not None and i == len(loc) - 1:  # an unknown key of a section
            keys.append(part)
            field = None
        else:  # a tag such as "literal['auto']" or "list[str]": not a key
            tagged = True
    return keys, field, tagged


def _expected(annotation: Any) -> str:
    """``'auto', a list of module-name suffixes or one regex string`` for ``Literal['auto'] | list[str] | str``."""
    words: list[str] = []
    for member in get_args(annotation):
        if get_origin(member) is Literal:
            words += [repr(v) for v in get_args(member)]
        else:
            name = getattr(member, "__name__", None) if get_origin(member) is None else None
            name = name or str(member).replace("typing.", "")
            words.append(UNION_MEMBER_WORDS.get(name, name))
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a mapping"


def format_errors(err: ValidationError, root: type[BaseModel], sections: dict[str, type[BaseModel]]) -> RecipeError:
    """Every validation problem of a recipe as one :class:`RecipeError`, each line naming its key and the fix.

    Args:
        err: pydantic's error for the whole recipe.
        root: The recipe model (its fields are the sections).
        sections: Section name -> section model, for did-you-mean hints on unknown keys.
    """
    lines: list[str] = []
    hints: list[str] = []
    for e in err.errors():
        keys, field, tagged = _location(e["loc"], root)
        key = ".".join(keys)
        if e["type"] == "extra_forbidden":
            section = sections.get(keys[0]) if len(keys) == 2 else (root if len(keys) == 1 else None)
            fields = list(section.model_fields) if section else []
            hint = suggest(keys[-1], fields)
            lines.append(f"{key}: unknown key" + (f" ({hint})" if hint else ""))
            if fields:
                hints.append(f"valid keys in '{keys[0] if len(keys) == 2 else 'the recipe'}': {', '.join(fields)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        elif tagged and field is not None and get_origin(field.annotation) in (Union, UnionType):
            # one error per union member (and per bad list item): one line naming every accepted form instead
            key = ".".join(k for k in keys if not k.isdigit())
            lines.append(f"{key}: expected {_expected(field.annotation)} (got {_shown(e.get('input'))})")
        else:
            lines.append(f"{key}: {e['msg']} (got {_shown(e.get('input'))})")
    # keep the first line of each key (a union reports its whole value first)
    seen: set[str] = set()
    unique = [ln for ln in lines if not (ln.split(":")[0] in seen or seen.add(ln.split(":")[0]))]
    n = len(unique)
    head = unique[0] if n == 1 else f"{n} problems in the recipe:\n  " + "\n  ".join(unique)
    key = unique[0].split(":")[0] if n == 1 else None
    if n == 1:
        head = head[len(key) + 2 :]
    return RecipeError(key, head, hints[0] if len(hints) == 1 else None)
