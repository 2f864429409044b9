"""Service configs as frozen dataclasses, turned into argparse flags with environment twins.

Every field `foo_bar` becomes the flag `--foo-bar` and the variable `RADIXSERVE_FOO_BAR`; the
flag wins over the variable, the variable over the dataclass default. Field metadata carries the
help text and, for pluggable choices, the registry that feeds `choices=`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

ENV_PREFIX = "RADIXSERVE_"
C = TypeVar("C")


def option(default: Any, help: str, choices: Iterable[str] | None = None, **kw: Any) -> Any:
    """A dataclass field with the help text and choices its flag needs."""
    meta = {"help": help, "choices": list(choices) if choices is not None else None}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta, **kw)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation like `int`, `str | None` or `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _env_default(field: dataclasses.Field, scalar: type, is_list: bool) -> Any:
    raw = os.environ.get(env_name(field.name))
    if raw is None:
        if field.default is not dataclasses.MISSING:
            return field.default
        return field.default_factory()  # type: ignore[misc]
    if is_list:
        return [scalar(part) for part in raw.replace(",", " ").split()]
    if scalar is bool:
        return _parse_bool(raw)
    return scalar(raw)


def add_arguments(
    parser: argparse.ArgumentParser, config_cls: type, skip: Iterable[str] = ()
) -> list[str]:
    """Adds one flag per field of `config_cls` (but those in `skip`), defaulting to its
    environment twin; returns the field names added."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(config_cls.__name__)
    skipped, added = set(skip), []
    for field in dataclasses.fields(config_cls):
        if field.name in skipped:
            continue
        added.append(field.name)
        scalar, is_list = _base_type(hints[field.name])
        default = _env_default(field, scalar, is_list)
        help_text = f"{field.metadata.get('help', '')} [env {env_name(field.name)}]"
        kwargs: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar
            kwargs["choices"] = field.metadata.get("choices")
            if is_list:
                kwargs["nargs"] = "+"
        group.add_argument(flag_name(field.name), **kwargs)
    return added


def from_args(config_cls: type[C], args: argparse.Namespace) -> C:
    """Builds the config from parsed args (fields `__post_init__` validates)."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def to_argv(config: Any) -> list[str]:
    """The command-line flags that reproduce `config` (used to start child services)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(field.name) if value else "--no-" + flag_name(field.name)[2:])
        elif isinstance(value, list):
            if value:
                argv += [flag_name(field.name), *map(str, value)]
        else:
            argv += [flag_name(field.name), str(value)]
    return argv
