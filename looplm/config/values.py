"""Turning user values (JSON, YAML, command-line strings) into typed config fields.

Every config section is a dataclass; ``from_dict`` builds one from a mapping, refusing unknown
keys and values of the wrong type with one line that names the key.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from looplm.errors import LoopLMError, one_line


def check(condition: bool, message: str) -> None:
    """Raise ``message`` as a one-line LoopLMError unless ``condition`` holds."""
    if not condition:
        raise LoopLMError(message)


def check_finite(items: typing.Iterable[tuple[str, Any]], section: str) -> None:
    """Every float value finite: a NaN or inf setting would train or decode to NaN without a word."""
    for name, value in items:
        check(not isinstance(value, float) or math.isfinite(value), f"{section}.{name} must be a finite number,"
              f" got {value}")


def dataclass_items(config: Any) -> list[tuple[str, Any]]:
    """(name, value) of a dataclass's fields."""
    return [(item.name, getattr(config, item.name)) for item in fields(config)]


def _number(value: Any, kind: type, where: str) -> int | float:
    """Parse an int or float field; "1e-3" and 3.0 are accepted where they are exact."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise LoopLMError(f"{where} must be {wanted}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoopLMError(f"{where} must be {wanted}, got {value!r}") from None
    if not math.isfinite(number):
        raise LoopLMError(f"{where} must be a finite number, got {value!r}")
    if kind is float:
        return number
    if not number.is_integer():
        raise LoopLMError(f"{where} must be an integer, got {value!r}")
    return int(number)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a JSON/YAML/CLI value into the field's declared type, or raise one line."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, options[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise LoopLMError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float):
        return _number(value, annotation, where)
    if annotation is str:
        return str(value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise LoopLMError(f"{where} must be a JSON object, got {value!r}") from None
        check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, raw: dict, section: str) -> Any:
    """Build config dataclass ``cls`` from a mapping; unknown keys and bad types raise LoopLMError.
    A class with its own ``from_mapping`` (``ModelConfig``: flat or grouped keys) builds itself."""
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(raw, section)
    check(isinstance(raw, dict), f"config section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    for key in raw:
        if key not in known:
            raise LoopLMError(
                f"unknown config key {section}.{key}: valid keys are {', '.join(sorted(known))}")
    values = {key: coerce(value, hints[key], f"{section}.{key}") for key, value in raw.items()}
    return cls(**values)


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (one-line errors for missing/bad files)."""
    path = Path(path)
    check(not path.is_dir(), f"config file {str(path)!r} is a directory: give a YAML or JSON config file")
    check(path.is_file(), f"config file {str(path)!r} not found: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LoopLMError(f"config file {str(path)!r} is not UTF-8 text: give a YAML or JSON config file") from None
    except OSError as error:
        raise LoopLMError(f"config file {str(path)!r} could not be read ({error.strerror}): check its"
                          " permissions") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # json and yaml raise many types; all mean "not parseable"
        raise LoopLMError(f"config file {str(path)!r} could not be parsed: {parse_problem(error)}") from None
    return data or {}


def parse_problem(error: Exception) -> str:
    """A JSON or YAML parser's error as one line with where it is: "expected ',' or ']', but got
    '<stream end>' at line 2, column 1 (while parsing a flow sequence started at line 1, column 8)"."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None or mark is None:  # JSON's message already says "line L column C"; others as they are
        return one_line(error) or type(error).__name__
    where = f"{one_line(problem)} at line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        where += f" ({one_line(context)} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return where
