"""Strict configs: dataclass schema -> YAML files -> `key=value` overrides (lingua style).

Every entry point parses its argv with :func:`parse_config`::

    cfg = parse_config(RunConfig, ["config=configs/cifar10.yaml,configs/profiles/cpu.yaml", "synthesis.g_steps=10"])

`config=` takes one file or a comma-separated list merged left to right; a key that the schema does not
have fails with :class:`ConfigError`, naming the key, the closest valid key and the valid keys at that level.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import os
import re
import tokenize
import typing
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says what is allowed."""


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        full = f"{prefix}{f.name}"
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_schema_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def _check_keys(schema: Any, given: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `given` (a plain dict) that `schema` lacks."""
    if not isinstance(given, dict):
        return
    names = {f.name: getattr(schema, f.name) for f in dataclasses.fields(schema)}
    for key, value in given.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = sorted(names)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{full}' in {where}{hint}; valid keys"
                f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"
            )
        if dataclasses.is_dataclass(names[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' in {where} is a section; set its fields, e.g. {full}.<field>=...")
            _check_keys(names[key], value, where, full + ".")


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: '{path}'")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml syntax errors come in many types
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _override(schema: Any, key: str, value: str) -> Any:
    """One `key=value` item as a config. A key the schema types `str` takes the value verbatim: YAML would read
    `name=007` as 7 and a Tune trial id such as `name=13121_00000` as the integer 1312100000. `key=` clears a string
    (OmegaConf would read it as null); `key=null` sets an optional to None; quotes around the whole value, as
    YAML's (`name='007'`), are taken off."""
    *parents, leaf = key.split(".")
    for part in parents:
        schema = getattr(schema, part, None)
    hints = typing.get_type_hints(type(schema)) if dataclasses.is_dataclass(schema) else {}
    if hints.get(leaf) in (str, typing.Optional[str]) and value != "null":
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        nested: Any = value[1:-1] if quoted else value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        return OmegaConf.create(nested)
    return OmegaConf.from_dotlist([f"{key}={value}" if value else f"{key}=''"])


def parse_config(schema_cls: type[T], argv: Sequence[str]) -> T:
    """Build a validated config object of `schema_cls` from `config=<files>` and `key=value` items."""
    schema = schema_cls()
    merged = OmegaConf.structured(schema)
    files: list[str] = []
    overrides: list[str] = []
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not key=value; use config=<file.yaml> or e.g. synthesis.g_steps=10")
        key, value = item.split("=", 1)
        if key == "config":
            files.extend(p for p in value.split(",") if p)
        else:
            overrides.append(item)
    try:
        for path in files:
            data = _load_yaml(path)
            _check_keys(schema, data, f"'{path}'")
            merged = OmegaConf.merge(merged, data)
        for item in overrides:
            key, value = item.split("=", 1)
            override = _override(schema, key, value)
            _check_keys(schema, OmegaConf.to_container(override), f"override '{item}'")
            merged = OmegaConf.merge(merged, override)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        # Type errors: keep OmegaConf's first line (it names the value and the expected type) and add the key.
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"bad value for config key '{key}': {msg}" if key else f"bad config value: {msg}") from None
    cfg = OmegaConf.to_object(merged)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg  # type: ignore[return-value]


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what a run folder keeps as config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def schema_keys(schema_cls: type) -> list[str]:
    """All dotted leaf keys of a schema (for help texts and error messages)."""
    return _schema_keys(schema_cls())


def describe_keys(schema_cls: type) -> list[tuple[str, Any, str]]:
    """(dotted key, default, comment) for every leaf key of a schema, the comment being the one written next to
    (or in the comment lines just above) the field in the dataclass source (help texts)."""
    return _describe(schema_cls(), "")


def _describe(node: Any, prefix: str) -> list[tuple[str, Any, str]]:
    comments = field_comments(type(node))
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_describe(value, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value, comments.get(f.name, "")))
    return out


_FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its source comment (block comment lines above it, then the trailing one), over the MRO."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (e.g. a frozen app): keys without comments
            continue
        trailing, block_lines = {}, set()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                row = token.start[0]
                trailing[row] = token.string.lstrip("#").strip()
                if not token.line[:token.start[1]].strip():
                    block_lines.add(row)
        pending: list[str] = []
        for row, line in enumerate(source.splitlines(), start=1):
            if row in block_lines:
                pending.append(trailing[row])
                continue
            match = _FIELD.match(line)
            if match and not line.strip().startswith(("def ", "@")):
                text = pending + ([trailing[row]] if row in trailing else [])
                if text:
                    comments[match.group(1)] = " ".join(text)
            pending = []
    return comments


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


__all__ = ["ConfigError", "parse_config", "config_to_yaml", "schema_keys", "describe_keys", "as_dict"]
