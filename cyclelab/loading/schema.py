"""JSON files checked against a JSON Schema (draft 2020-12), with the first problem told plainly.

A schema names what each field expects in its own words, under the keyword ``x-expected``
(e.g. ``"an integer >= 0"``); :func:`problem` turns the first jsonschema error into
``records[3].token_id must be an integer >= 0, got True``, ``settings lacks the field(s) ['x']``
or ``the file has unknown field(s) ['extra']``. Callers add the file's name and the fix.

JSON's integers and numbers are read strictly, as :func:`is_int` and :func:`is_number` do:
``true`` is not an integer, ``1.0`` is not an integer, NaN and infinities are not numbers.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError


def is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for a finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPES = Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": lambda _, value: is_int(value), "number": lambda _, value: is_number(value)}
)
StrictValidator = validators.extend(Draft202012Validator, type_checker=_TYPES)
"""Draft 2020-12 with strict integers and finite numbers."""


@functools.cache
def validator(package: str, name: str) -> Draft202012Validator:
    """The validator for the schema file ``name`` shipped in ``package`` (the schema itself checked once)."""
    schema = json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return StrictValidator(schema)


def json_path(parts: Iterable[str | int]) -> str:
    """``["records", 3, "token_id"]`` as ``records[3].token_id``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def shown(value: object) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problem(check: Draft202012Validator, instance: object, whole: str = "the file", **values: object) -> str | None:
    """The first thing wrong with ``instance``, in words (``whole`` names the top level), or None.

    Shallow problems come first, and an object's missing or unknown fields before its values.
    ``values`` fill the ``{placeholders}`` of an ``x-expected`` text."""
    errors = sorted(check.iter_errors(instance), key=lambda e: (len(e.absolute_path), e.validator not in _KEYS))
    return _explain(errors[0], check.schema, instance, whole, values) if errors else None


_KEYS = ("required", "additionalProperties")


def _explain(error: ValidationError, schema: Mapping, document: Any, whole: str, values: Mapping[str, object]) -> str:
    if error.validator in _KEYS:
        found = error.instance if isinstance(error.instance, dict) else {}
        if error.validator == "required":
            names, what = [k for k in error.schema["required"] if k not in found], "lacks the field(s)"
        else:
            names, what = [k for k in found if k not in error.schema.get("properties", {})], "has unknown field(s)"
        return f"{json_path(error.absolute_path) or whole} {what} {sorted(names)}"
    depth, expected = _expectation(schema, list(error.absolute_schema_path))
    if expected is None:
        depth, expected = len(error.absolute_path), error.message
    path = list(error.absolute_path)[:depth]
    value = functools.reduce(lambda v, k: v[k], path, document)
    for key, filler in values.items():
        expected = expected.replace("{" + key + "}", str(filler))
    return f"{json_path(path) or whole} must be {expected}, got {shown(value)}"


_NAMED = {"properties", "patternProperties", "prefixItems", "allOf", "anyOf", "oneOf", "dependentSchemas"}
_SUB = {"items", "additionalProperties", "contains", "not", "if", "then", "else", "unevaluatedItems"}
_DESCEND = {"properties", "patternProperties", "prefixItems", "items", "additionalProperties", "contains"}


def _expectation(schema: Mapping, schema_path: list) -> tuple[int, str | None]:
    """Along the failing keyword's schema path: the deepest ``x-expected`` and how deep in the instance it sits.

    jsonschema's paths step through a ``$ref`` without naming it: a node's reference is followed when
    the next keyword is not the node's own."""
    node, depth, found = schema, 0, (0, schema.get("x-expected"))
    steps = iter(schema_path)
    for keyword in steps:
        while keyword not in node and "$ref" in node:
            node = _resolve(schema, node["$ref"])
            found = (depth, node["x-expected"]) if "x-expected" in node else found
        if keyword in _NAMED:
            node = node[keyword][next(steps)]
        elif keyword in _SUB and isinstance(node[keyword], Mapping):
            node = node[keyword]
        else:
            break  # the failing keyword itself (type, minimum, items: false, ...)
        depth += keyword in _DESCEND
        found = (depth, node["x-expected"]) if "x-expected" in node else found
    return found


def _resolve(schema: Mapping, ref: str) -> Mapping:
    """A local reference, ``#/$defs/name``, in ``schema``."""
    if not ref.startswith("#/"):
        raise ValueError(f"only local $refs (#/...) are supported in cyclelab's schemas, got {ref!r}")
    return functools.reduce(lambda node, key: node[key], ref[2:].split("/"), schema)
