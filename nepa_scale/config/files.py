"""Settings files: YAML reading, dotted keys (``a.b.c``) and ``key=value`` overrides, for run
configs, sweeps, attach entries and cluster profiles alike; the keys old run configs may hold; and
the check that a folder a setting or option names can be made there."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from nepa_scale.errors import ConfigError, UsageError

# Keys this project no longer reads: one at null (an old run's config.yaml) is dropped, one set to a
# value is refused with its replacement named (RunConfig); drop_retired takes them out of a record.
RETIRED_KEYS = {"logging.probe_limit": "use logging.probe_train_per_class and logging.probe_val_per_class"}
_ABSENT = object()  # get_dotted's default where a key at null must count as present


def get_dotted(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``data["a"]["b"]["c"]`` for ``dotted="a.b.c"``, or ``default`` where it is not there."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``dotted="a.b.c"``, creating sections on the way."""
    parts = dotted.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def pop_dotted(data: dict[str, Any], dotted: str) -> None:
    """Remove ``dotted`` from ``data`` where it is there."""
    section, _, last = dotted.rpartition(".")
    node = get_dotted(data, section) if section else data
    if isinstance(node, dict):
        node.pop(last, None)


def drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the retired keys (a recorded config written by older code): a copy where
    one is there, ``data`` itself where none is (every config read, so no copy for nothing)."""
    if all(get_dotted(data, dotted, _ABSENT) is _ABSENT for dotted in RETIRED_KEYS):
        return data
    data = copy.deepcopy(data)
    for dotted in RETIRED_KEYS:
        pop_dotted(data, dotted)
    return data


def parse_override(item: str, what: str = "override") -> tuple[str, Any]:
    """``"a.b.c=value"`` -> ``("a.b.c", value)`` with the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{what} '{item}': expected key=value")
    dotted, raw = item.split("=", 1)
    return dotted.strip(), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a one-line ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} file {path} is a directory: name the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def check_output_folder(path: str | Path, what: str) -> None:
    """``path`` is a folder or can become one: a UsageError naming ``what`` (the key or option that
    set it) when it, or a folder it would be made in, is a file; said before any work is done."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                inside = "" if folder == path else f" (so {path} cannot be made inside it)"
                raise UsageError(f"{what}: {folder} is a file, not a folder{inside}")
            return
