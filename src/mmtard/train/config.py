"""Run configuration: YAML file, then ``--set a.b=value`` overrides, validated into typed dataclasses.

Order of precedence: dataclass defaults < the method preset (``method.name``) < the YAML file < ``--set``.
Units are never rewritten after parsing: ``eps: 4/255`` is read once into the float ``0.01568...``.
The resolved config is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmtard.errors import ConfigError
from mmtard.methods.config import MethodConfig, method_config
from mmtard.units import parse_eps


@dataclass
class ModelConfig:
    """A CLIP model: open_clip architecture (or ``hf-hub:`` id) and its weights."""

    arch: str = "tiny-vit-s"
    pretrained: str = "none"
    trust_checkpoint: bool = False


@dataclass
class LoraConfig:
    """LoRA through peft. ``targets`` are module-name suffixes inside the image tower; open_clip ViTs
    compute attention with ``nn.MultiheadAttention``, whose ``out_proj`` is bypassed by its fused kernel,
    so the default adapts the MLP layers ``c_fc`` and ``c_proj``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj"])


@dataclass
class StudentConfig(ModelConfig):
    """The student: ``finetune: full`` trains the whole image tower, ``lora`` only LoRA adapters.
    The text tower is always frozen."""

    finetune: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Training and held-out data. ``batch_size`` is the global batch, split across processes."""

    dataset: str = "cifar10"
    dir: str | None = None
    split: str = "train"
    classes: str = "seen"
    samples: int | None = None
    batch_size: int = 128
    workers: int = 0
    eval_split: str = "test"
    eval_classes: str = "seen"
    eval_samples: int | None = 200


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warm-up of ``warmup`` (fraction of the steps)."""

    steps: int = 100
    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0.07
    grad_clip: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    """Periodic held-out evaluation (clean and PGD robust) every ``every`` steps (0: never) and, with
    ``final``, once at the end (``final_eval.json``)."""

    every: int = 0
    attack: str = "pgd"
    eps: list[float] = field(default_factory=lambda: [4 / 255])
    steps: int = 10
    batch_size: int = 128
    final: bool = True


@dataclass
class RunConfig:
    """Everything one training run needs. ``teachers`` maps a role (``clean``, ``robust``) to a model."""

    output_dir: str = "runs/default"
    device: str = "auto"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, ModelConfig] = field(default_factory=dict)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> RunConfig:
        from mmtard.methods import create_method

        method = create_method(self.method)
        missing = [role for role in method.teacher_roles if role != "original" and role not in self.teachers]
        if missing:
            raise ConfigError(
                f"teachers: method {self.method.name} needs teacher(s) {missing}; "
                "add teachers.<role>.arch and .pretrained"
            )
        if self.student.finetune not in ("full", "lora"):
            raise ConfigError(f"student.finetune: expected full or lora, got {self.student.finetune!r}")
        if self.train.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision: expected auto, fp32, bf16 or fp16, got {self.train.precision!r}")
        for name, value, low in (
            ("train.steps", self.train.steps, 1),
            ("data.batch_size", self.data.batch_size, 1),
            ("train.checkpoint_every", self.train.checkpoint_every, 0),
            ("eval.every", self.eval.every, 0),
            ("train.log_every", self.train.log_every, 1),
            ("train.keep_checkpoints", self.train.keep_checkpoints, 1),
        ):
            if value < low:
                raise ConfigError(f"{name}: expected a whole number >= {low}, got {value}")
        if not self.train.lr > 0:
            raise ConfigError(f"train.lr: expected a positive learning rate, got {self.train.lr}")
        if not 0 <= self.train.warmup < 1:
            raise ConfigError(f"train.warmup: expected a fraction of the steps in [0, 1), got {self.train.warmup}")
        return self


# Attack radii and step sizes: fractions of the pixel range, written like 4/255.
EPS_FIELDS = {"method.eps", "method.alpha", "eval.eps"}
DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(path, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {annotation}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            value = [value]
        return [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float:
        if path.split("[")[0] in EPS_FIELDS:
            return parse_eps(value, path)
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
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; expected one of: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        if cls is RunConfig and name == "teachers":
            if not isinstance(value, dict):
                raise ConfigError(f"teachers: expected a mapping role -> model, got {value!r}")
            values[name] = {role: _build(ModelConfig, spec, f"teachers.{role}") for role, spec in value.items()}
        elif cls is RunConfig and name == "method":
            values[name] = _build_method(value, sub)
        else:
            values[name] = _check_type(sub, value, hints[name])
    return cls(**values)


def _build_method(data: Any, path: str) -> MethodConfig:
    data = dict(data or {})
    preset = data.pop("name", "mmt-ard")
    hints = typing.get_type_hints(MethodConfig)
    checked = {}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"unknown config key '{path}.{name}'; expected one of: {', '.join(hints)}")
        checked[name] = (
            value if name == "logit_scale" and value == "model" else _check_type(f"{path}.{name}", value, hints[name])
        )
    try:
        return method_config(preset, **checked)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value read as YAML: ``20`` is an int, ``4/255`` stays text)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply overrides, validate; every error names the offending key."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config: file '{path}' does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: '{path}' must hold a mapping of sections")
    data = apply_overrides(data, overrides)
    return _build(RunConfig, data, "").validate()


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    from mmtard.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
