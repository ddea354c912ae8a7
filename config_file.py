"""Settings files for every configurable part of the pack: frozen dataclasses that round-trip
through TOML and JSON, parse strictly (an unknown key gets a did-you-mean, a wrong type names the
key) and fingerprint what changes a result. The trainer's and the loop's configs both build on
``ConfigFile``; the ``require_*`` helpers are how their ``problems()`` word a bad value.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .safe_io import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

ConfigT = TypeVar("ConfigT", bound="ConfigFile")


class ConfigFile:
    """TOML/JSON I/O, strict parsing and fingerprints for the frozen config dataclasses below."""

    # Fields that change where or how a run is stored, not what it learns (left out of fingerprints).
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Result fields added after release: in fingerprints only when set away from their default.
    LATER_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    # -- dict ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
        """Build from a mapping; unknown keys, wrong types and missing required settings are one
        error naming each key."""
        values, failures = cls.parse_settings(data)
        if failures:
            raise ValueError(f"{source}: " + "; ".join(failures.values()))
        return cls(**values)

    @classmethod
    def parse_settings(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """(the settings that parse, {setting: its problem} for every unknown, mistyped or missing
        one), all at once; ``load_checked`` builds what it can from the first and reports both."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints_by_name = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for name, value in data.items():
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                failures[name] = (f"unknown setting {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                  + f"; known settings: {', '.join(fields)}")
                continue
            try:
                values[name] = _coerce(value, hints_by_name[name])
            except (TypeError, ValueError) as exc:
                failures[name] = f"{name}: {exc}"
        for name, f in fields.items():
            if name not in values and name not in failures and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                failures[name] = f"{name}: required setting is missing"
        return values, failures

    @classmethod
    def load_checked(cls: type[ConfigT], path: str | os.PathLike, *, check_paths: bool = True) -> ConfigT:
        """``load`` and ``validate`` in one, reporting every problem at once: the settings that do
        not parse (each then left at its default, or empty) together with ``problems()`` of the
        rest. For configs with a ``problems(check_paths=...)`` method."""
        path = Path(path)
        values, failures = cls.parse_settings(cls.read_settings(path))
        for name, f in {f.name: f for f in dataclasses.fields(cls)}.items():
            if name in failures and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[name] = _empty_value(typing.get_type_hints(cls)[name])
        config = cls(**values)
        problems = list(failures.values()) + [
            problem for problem in config.problems(check_paths=check_paths)
            if not any(problem.startswith((f"{name}=", f"{name}:", f"{name} ")) for name in failures)]
        if problems:
            raise ValueError(f"{path}:\n  - " + "\n  - ".join(problems))
        return config

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls: type[ConfigT], text: str, *, source: str = "config") -> ConfigT:
        return cls.from_dict(_json_settings(text, source), source=source)

    def to_toml(self) -> str:
        return dump_flat_toml(self.to_dict())

    @classmethod
    def from_toml(cls: type[ConfigT], text: str, *, source: str = "config") -> ConfigT:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{source}: not valid TOML ({exc})") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls: type[ConfigT], path: str | os.PathLike) -> ConfigT:
        """Read ``.toml`` or ``.json`` (by extension)."""
        return cls.from_dict(cls.read_settings(path), source=str(path))

    @classmethod
    def read_settings(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The settings table of a ``.toml`` or ``.json`` file (by extension), not yet checked."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return _json_settings(text, str(path))
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from exc

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``.toml`` or ``.json`` (by extension), atomically (``safe_io``: a hidden temporary,
        removed if the write fails, then a rename). An existing file is replaced only with ``overwrite``."""
        path = Path(path)
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_toml()
        return atomic_write_text(path, text, overwrite=overwrite, what="config file")

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self, **extra: Any) -> str:
        """sha256 over the fields that change the trained result (plus ``extra``, e.g. file hashes).
        Fields in ``LATER_RESULT_FIELDS`` (added after runs were fingerprinted) count only when they
        differ from their default, so runs that do not use them keep the fingerprint they had."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        payload = {k: v for k, v in self.to_dict().items() if k not in self.NON_RESULT_FIELDS
                   and not (k in self.LATER_RESULT_FIELDS and _same_value(v, defaults.get(k)))}
        payload["__class__"] = type(self).__name__
        payload.update({f"extra:{k}": v for k, v in extra.items()})
        blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()


def _same_value(value: Any, default: Any) -> bool:
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value) == list(default)
    return value == default


# -- what each setting means ----------------------------------------------------------------------

def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for a config dataclass and the classes it inherits from: the
    ``# ...`` comment at the end of the line that declares the field. Those comments are the one
    description of each setting: the code's readers see them, and ``versat2i loop --print-config``
    prints them. A field declared without one is left out (tests require one for every setting the
    loop accepts)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source file (a class built at run time)
            continue
        trailing = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT and token.line[:token.start[1]].strip():
                trailing[token.start[0]] = token.string.lstrip("#").strip()
        (class_node,) = ast.parse(source).body
        for node in class_node.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.end_lineno in trailing:
                comments[node.target.id] = trailing[node.end_lineno]
    return comments


# -- problems() helpers: each appends one line naming the setting and the fix ---------------------

@dataclasses.dataclass(frozen=True)
class SettingRange:
    """The smallest and largest value a numeric setting may take (inclusive)."""

    minimum: int | float
    maximum: int | float


def _json_settings(text: str, source: str) -> dict[str, Any]:
    """The settings object of a JSON text; ``ValueError`` naming ``source`` otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of settings")
    return data


def require_in_range(p: list[str], name: str, value: float, limits: SettingRange) -> None:
    if not math.isfinite(value):
        p.append(f"{name}={value}: must be a number between {limits.minimum} and {limits.maximum}")
    elif value < limits.minimum:
        p.append(f"{name}={value}: must be >= {limits.minimum}")
    elif value > limits.maximum:
        p.append(f"{name}={value}: must be <= {limits.maximum} (the most the training nodes offer); lower it")


def require_choice(p: list[str], name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        p.append(f"{name}={value!r}: must be one of {', '.join(choices)}")


def require_at_least(p: list[str], name: str, value: int, minimum: int) -> None:
    if value < minimum:
        p.append(f"{name}={value}: must be >= {minimum}")


def require_positive(p: list[str], name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        p.append(f"{name}={value}: must be a positive number")


def _empty_value(hint: Any) -> Any:
    """A stand-in for a required setting that did not parse (its problem is reported already)."""
    origin = typing.get_origin(hint)
    return {int: 0, float: 0.0, bool: False, str: ""}.get(hint, origin() if origin in (tuple, list) else None)


def _coerce(value: Any, hint: Any) -> Any:
    """Strict scalar coercion for settings read from TOML/JSON (ints are accepted for floats)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-4" written as a string
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"expected a string, got {value!r}")
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        (item,) = set(typing.get_args(hint)) - {Ellipsis} or {str}
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return origin(_coerce(v, item) for v in value)
    return value


def dump_flat_toml(data: dict[str, Any]) -> str:
    """TOML for a flat table of scalars and lists of scalars; ``None`` values are left out.

    Written by hand because the standard library only reads TOML (``tomllib``) and a writer
    dependency for ~20 lines of flat keys is not worth it; ``from_toml`` round-trips it (tested).
    """
    lines = []
    for key, value in data.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any, *, width: int = 100) -> str:
    """One value in TOML; a list longer than ``width`` characters gets one item per line."""
    text = _toml_value(value)
    if len(text) <= width or not isinstance(value, (list, tuple)):
        return text
    return "[\n" + "".join(f"    {_toml_value(item)},\n" for item in value) + "]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(os.fspath(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")
