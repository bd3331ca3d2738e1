"""What an export starts from: a run folder (its student, config and final evaluation) or a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import yaml

from mmtard.errors import ConfigError
from mmtard.export.files import check_record, read_json
from mmtard.fileio import require_regular_file
from mmtard.models import CLIPBundle
from mmtard.models.loading import RANDOM_INIT
from mmtard.train.rundir import RunDir

# The preprocess settings an export records, as open_clip names them (open_clip's PreprocessCfg).
PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class ExportSource:
    """The weights to export and what is known about how they were made.

    Attributes:
        arch: the open_clip architecture (``--model``).
        weights: what ``load_clip`` reads: a checkpoint file, an open_clip tag, or ``none``.
        run: the run folder, when ``--pretrained`` named one.
        run_config: the run's resolved ``config.yaml`` as a mapping (``None`` without a run folder).
        final_eval: the run's ``final_eval.json`` (``None`` when absent).
        base_tag: the open_clip pretrained tag the weights started from, when known (the run's
            ``student.pretrained``, or ``--pretrained`` itself).
        vision_weights: the image-tower file loaded over ``weights`` (``--vision-weights``), if any.
        vision_weights_alpha: its weight against the base tower (``--vision-weights-alpha``), with it.
        run_starts: the run's ``provenance.json``: one record per start of its training (``None`` when absent).
    """

    arch: str
    weights: str
    run: RunDir | None = None
    run_config: dict | None = None
    final_eval: dict | None = None
    base_tag: str | None = None
    vision_weights: str | None = None
    vision_weights_alpha: float | None = None
    run_starts: list[dict] | None = None

    @property
    def weights_file(self) -> Path | None:
        """The checkpoint file read, or ``None`` for a tag or random weights."""
        path = Path(self.weights)
        return path if path.is_file() else None


def _tag_of(arch: str, pretrained: str | None) -> str | None:
    if pretrained and pretrained in open_clip.list_pretrained_tags_by_model(arch):
        return pretrained
    return None


def resolve_source(arch: str, pretrained: str | Path) -> ExportSource:
    """Read a run folder's config and final evaluation, or take ``pretrained`` as a checkpoint or tag.

    Args:
        arch: ``--model``; for a run folder it must be the run's ``student.arch``.
        pretrained: a run folder (with ``model.safetensors`` and ``config.yaml``), a checkpoint file, an
            open_clip pretrained tag, or ``none``.

    Raises:
        FileNotFoundError: a run folder without its final ``model.safetensors`` or ``config.yaml``.
        ConfigError: ``--model`` differs from the architecture the run trained; its ``config.yaml`` or
            ``final_eval.json`` is unreadable or malformed (:func:`read_run_config`, :func:`read_final_eval`).
    """
    path = Path(pretrained)
    if not path.is_dir():
        return ExportSource(arch=arch, weights=str(pretrained), base_tag=_tag_of(arch, str(pretrained)))
    run = RunDir(path)
    for needed, what in ((run.model, "the final student"), (run.config, "the run config")):
        if not needed.is_file():
            raise FileNotFoundError(
                f"--pretrained: '{path}' is a folder without {needed.name} ({what}); give a finished run folder "
                "or a checkpoint file"
            )
    config = read_run_config(run.config)
    student = config.get("student") or {}
    if student.get("arch") != arch:
        raise ConfigError(
            f"--model: '{arch}', but the run in '{path}' trained a {student.get('arch')!r} student; "
            f"use --model {student.get('arch')}"
        )
    final_eval = read_final_eval(run.final_eval) if run.final_eval.exists() else None
    return ExportSource(
        arch=arch,
        weights=str(run.model),
        run=run,
        run_config=config,
        final_eval=final_eval,
        base_tag=_tag_of(arch, student.get("pretrained")),
        run_starts=read_run_starts(run.provenance) if run.provenance.exists() else None,
    )


#: the sections of a run config the model card reads, each a mapping when present
CARD_SECTIONS = ("student", "teachers", "method", "data", "train")


def read_run_config(path: Path) -> dict:
    """A run folder's ``config.yaml`` as a mapping whose sections the model card reads are mappings.

    Raises:
        ConfigError: naming ``--pretrained`` and the file: not a regular file, not UTF-8 YAML, empty, not a
            mapping, or a section of another type.
    """
    require_regular_file(path, "--pretrained", "the run's config.yaml")
    try:
        config = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"--pretrained: '{path}' is not readable YAML ({reason})") from None
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a {type(config).__name__}"
        raise ConfigError(f"--pretrained: '{path}' is {what}, expected the run's resolved config (a mapping)")
    for section in CARD_SECTIONS:
        if not isinstance(config.get(section) or {}, dict):
            raise ConfigError(f"--pretrained: '{path}' has {section}: {config[section]!r}, expected a mapping")
    teachers = config.get("teachers") or {}
    for name, teacher in teachers.items():
        if not isinstance(teacher, dict):
            raise ConfigError(f"--pretrained: '{path}' has teachers.{name}: {teacher!r}, expected a mapping")
    return config


def read_final_eval(path: Path) -> dict:
    """A run folder's ``final_eval.json``, checked as the model card reads it (:func:`check_record`).

    Raises:
        ConfigError: naming ``--pretrained`` and the file.
    """
    require_regular_file(path, "--pretrained", "the run's final_eval.json")
    record = read_json(path, "--pretrained")
    check_record(record, path, "--pretrained")
    return record


def read_run_starts(path: Path) -> list[dict]:
    """A run folder's ``provenance.json`` (:func:`mmtard.train.trainer.record_start`): a list of objects.

    Raises:
        ConfigError: naming ``--pretrained`` and the file.
    """
    require_regular_file(path, "--pretrained", "the run's provenance.json")
    starts = read_json(path, "--pretrained")
    if not isinstance(starts, list) or not all(isinstance(start, dict) for start in starts):
        raise ConfigError(f"--pretrained: '{path}' is not a list of the run's starts (objects)")
    return starts


def preprocess_config(bundle: CLIPBundle, base_tag: str | None) -> dict:
    """How images are prepared for the model: open_clip's preprocess config of the loaded model, with the
    settings of the pretrained tag the weights started from (the normalisation the model was trained with).

    Returns:
        ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, as open_clip names them.
    """
    config = dict(open_clip.get_model_preprocess_cfg(bundle.model))
    if base_tag is not None and base_tag.lower() not in RANDOM_INIT:
        tag_config = open_clip.get_pretrained_cfg(bundle.name, base_tag)
        config |= {key: tag_config[key] for key in PREPROCESS_KEYS if key in tag_config}
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in config.items()
        if key in PREPROCESS_KEYS
    }
