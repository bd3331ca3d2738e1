"""The typed YAML loader of run configs: files (with their ``defaults:`` chain), ``--set`` overrides, dataclasses.

Order of precedence: dataclass defaults < the method preset (``method.name``) < the YAML file (merged over
the files its ``defaults:`` key names, in order) < ``--set``. Units are never rewritten after parsing:
``eps: 4/255`` is read once (by :func:`mmtard.units.parse_eps`) into the float ``0.01568...``. Every value is
converted to its field's type or refused with a :class:`ConfigError` naming the field; the result is validated
(:meth:`RunConfig.validate`) before any model is built, and saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mmtard.errors import ConfigError
from mmtard.fileio import atomic_write_text, read_yaml_file
from mmtard.methods import MethodConfig, method_config
from mmtard.train.config import ModelConfig, RunConfig, TeacherConfig
from mmtard.units import is_radius, parse_eps

DEFAULTS_KEY = "defaults"


# Attack radii and step sizes: fractions of the pixel range, written like 4/255.


DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

#: A model field that only the command line sets (``mmtard train --trust-checkpoint``): unpickling a file can run
#: its code, so a run config (a file anyone may hand over) cannot ask for it. It is never saved in ``config.yaml``,
#: so a resumed run trusts nothing unless the flag is given again.
COMMAND_LINE_ONLY = "trust_checkpoint"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), field: str = "--config") -> RunConfig:
    """Read a YAML run config (and its ``defaults:`` chain), apply overrides, validate; every error names the
    offending key (a file that cannot be read as a run config: ``field``, the flag or field that named it)."""
    data = read_config_file(path, field) if path is not None else {}
    data = apply_overrides(data, overrides)
    return _build(RunConfig, data, "").validate()


def read_config_file(path: str | Path, field: str = "--config", _chain: tuple[Path, ...] = ()) -> dict:
    """A run config file merged over the files its ``defaults:`` names (one path or a list, relative to
    the file; later ones win, the file itself wins over all). The result has no ``defaults`` key."""
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{DEFAULTS_KEY}: '{path}' includes itself ({cycle})")
    data = read_yaml(path, field)
    if not data:  # every field at its default would be a run nobody asked for
        raise ConfigError(
            f"{field}: '{path}' is empty; expected a run config with sections student, teachers, method, data, "
            "train, eval (e.g. configs/cpu/mmt-ard.yaml)"
        )
    includes = data.pop(DEFAULTS_KEY, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{DEFAULTS_KEY}: in '{path}', expected a file name or a list of them, got {includes!r}")
    merged: dict = {}
    for include in includes:
        base = read_config_file(path.parent / include, f"{DEFAULTS_KEY} of '{path}'", (*_chain, path.resolve()))
        merged = merge(merged, base)
    return merge(merged, data)


def read_yaml(path: Path, field: str = "--config") -> dict:
    """A YAML file holding a mapping; a missing file or one that is no regular file (a FIFO), a parse error, a
    key written twice, or another shape is one error (:func:`mmtard.fileio.read_yaml_file`)."""
    if path.is_dir():
        raise ConfigError(f"{field}: '{path}' is a folder, not a file")
    if not path.exists():
        raise ConfigError(f"{field}: '{path}' does not exist")
    data = read_yaml_file(path, field, "a run config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``: mappings merge key by key, any other value replaces the base's."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value read as YAML: ``20`` is an int, ``4/255`` stays text)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set: {item!r} names no key (expected key.path=value, e.g. train.steps=200)")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(
                f"--set {key}: cannot read {raw[:40]!r} as a value (YAML: a number, text, [a, b]...)"
            ) from None
    return data


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown config key; expected one of: {', '.join(known)}")
    radii = {spec.name for spec in dataclasses.fields(cls) if is_radius(spec)}
    values = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        if cls is RunConfig and name == "teachers":
            if not isinstance(value, dict):
                raise ConfigError(f"teachers: expected a mapping teacher name -> model, got {value!r}")
            values[name] = {
                teacher: _build(TeacherConfig, spec, f"teachers.{teacher}") for teacher, spec in value.items()
            }
        elif cls is RunConfig and name == "method":
            values[name] = _build_method(value, sub)
        elif issubclass(cls, ModelConfig) and name == COMMAND_LINE_ONLY:
            _refuse_trust(sub, value)
        else:
            values[name] = _check_type(sub, value, hints[name], radius=name in radii)
    return cls(**values)


def _refuse_trust(path: str, value: Any) -> None:
    """``trust_checkpoint: true`` in a run config or ``--set`` is refused; ``false`` (what ``config.yaml`` files
    written before this rule hold) changes nothing and is accepted."""
    if _check_type(path, value, bool):
        raise ConfigError(
            f"{path}: a run config cannot trust a checkpoint file (unpickling it can run its code); give "
            "--trust-checkpoint on the mmtard train command line, and only for files you made yourself"
        )


def with_trusted_checkpoints(config: RunConfig) -> RunConfig:
    """``mmtard train --trust-checkpoint``: the student's and every teacher's ``.pt`` file may be a full pickle."""
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, trust_checkpoint=True),
        teachers={name: dataclasses.replace(spec, trust_checkpoint=True) for name, spec in config.teachers.items()},
    )


def _build_method(data: Any, path: str) -> MethodConfig:
    from mmtard.methods import list_methods

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {data!r}")
    data = dict(data)
    preset = data.pop("name", "mmt-ard")
    if preset not in list_methods():
        raise ConfigError(f"{path}.name: unknown method {preset!r}; expected one of {', '.join(list_methods())}")
    hints = typing.get_type_hints(MethodConfig)
    norm = data.get("norm", MethodConfig.norm)
    norm = norm if isinstance(norm, str) else MethodConfig.norm  # a wrong type is reported as method.norm
    radii = {spec.name for spec in dataclasses.fields(MethodConfig) if is_radius(spec)}
    checked = {}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"{path}.{name}: unknown config key; expected one of: {', '.join(hints)}")
        checked[name] = (
            value
            if name == "logit_scale" and value == "model"
            else _check_type(f"{path}.{name}", value, hints[name], norm, radius=name in radii)
        )
    try:
        return method_config(preset, **checked)
    except ConfigError as exc:
        raise exc.within(path) from None


def _check_type(path: str, value: Any, annotation: Any, norm: str = "linf", radius: bool = False) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``path``.

    Radii (``radius``: a field whose metadata is :data:`mmtard.units.RADIUS`) are read by :func:`parse_eps` in the
    given ``norm``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(path, value, option, norm, radius)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {annotation}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            value = [value]
        return [_check_type(f"{path}[{i}]", v, item, norm, radius) for i, v in enumerate(value)]
    if annotation is float:
        if radius:
            return parse_eps(value, path, norm)
        if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot in the mantissa) as text, not a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected text, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    return value


def config_to_dict(config: RunConfig) -> dict:
    """The config as plain data, as ``config.yaml`` holds it: without :data:`COMMAND_LINE_ONLY`."""
    data = dataclasses.asdict(config)
    for model in (data["student"], *data["teachers"].values()):
        model.pop(COMMAND_LINE_ONLY, None)
    return data


def save_config(config: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
