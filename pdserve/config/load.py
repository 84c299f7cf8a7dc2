"""Reading configs: YAML or JSON files and dicts into the schema's classes, errors naming the key."""

import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from pdserve.config.schema import ClusterConfig, ConfigError, Section

T = TypeVar("T", bound=Section)
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _allowed(cls: type, path: list[str]) -> str:
    """The keys accepted at `path` inside cls (for 'unknown key' messages)."""
    return ", ".join(sorted(f.name for f in msgspec.structs.fields(_type_at(cls, path))))


def _type_at(cls: type, path: list[str]) -> Any:
    """The annotated type of the setting at `path` (Annotated and Literal unwrapped to the Literal)."""
    tp: Any = cls
    for part in path:
        tp = typing.get_type_hints(tp).get(part, tp)
    return tp


def _error(e: msgspec.ValidationError, cls: type) -> ConfigError:
    m = _AT.match(str(e))
    assert m is not None  # the pattern matches any string
    msg, path = m["msg"], [p for p in (m["path"] or "").split(".") if p]
    unknown = _UNKNOWN.match(msg)
    if unknown:
        key = ".".join([*path, unknown["key"]])
        return ConfigError(f"{key}: unknown key (allowed: {_allowed(cls, path)})")
    if ": " in msg and not msg.startswith(("Expected", "Invalid")):  # a ConfigError from __post_init__
        return ConfigError(".".join([*path, msg]))
    if msg.startswith("Invalid enum value"):
        choices = typing.get_args(_type_at(cls, path))
        names = ", ".join(str(c) or '""' for c in choices)
        msg = f"must be one of {names}, got {msg.split(' ', 3)[-1]}"
    return ConfigError(f"{'.'.join(path) or 'config'}: {msg[0].lower()}{msg[1:]}")


def convert(data: Any, cls: type[T]) -> T:
    """Build cls from plain data (a YAML mapping), refusing unknown keys and bad values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if v is not None}  # `prefill:` with nothing under it
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as e:
        raise _error(e, cls) from None


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) file's mapping; {} for an empty file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the cluster file must be a mapping of sections")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base with over on top, section by section (flags over a file)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cluster_from_dict(data: dict[str, Any]) -> ClusterConfig:
    """Validate a cluster description; errors name the offending key, e.g. `decode.max_batch_size`."""
    return convert(data, ClusterConfig)


def load_cluster_file(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """The cluster of a YAML file, with `overrides` (nested like the file) on top."""
    return cluster_from_dict(merge(read_file(path), overrides or {}))


def to_dict(cfg: Section) -> dict[str, Any]:
    """Plain data that `convert` turns back into an equal config (for files and the wire)."""
    return typing.cast(dict[str, Any], msgspec.to_builtins(cfg))
