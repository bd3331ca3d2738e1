"""The checks of a run before anything is built or written (:func:`check_run`), and the one check that needs the
built models (:func:`check_built_image_sizes`).

Each raises one :class:`ConfigError` naming the field or flag, so a refused run leaves the file system as it
found it: no run folder, ``config.yaml`` or ``tensorboard/`` is created, and no warning is logged before the
error (the warnings of a run that passes come after every check).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from mmtard import preflight
from mmtard.distributed import DistEnv
from mmtard.errors import ConfigError
from mmtard.models.loading import tower_image_size
from mmtard.train import checkpoint as ckpt
from mmtard.train.build import build_precision, data_fields
from mmtard.train.config import RunConfig
from mmtard.train.config_io import load_config
from mmtard.train.resume import check_resume
from mmtard.train.rundir import CHECKPOINTS_DIR, MODEL_FILE, RunDir, RunLock, read_jsonl

logger = logging.getLogger(__name__)


def check_run_files(run: RunDir) -> None:
    """The run's own files (``config.yaml``, ``provenance.json``, the logs, the model) are files where they exist:
    a folder in the place of one would stop the run after its first writes.

    Raises:
        ConfigError: ``output_dir: ...`` naming the path.
    """
    for path in (run.config, run.provenance, run.metrics, run.eval_log, run.model, run.final_eval, run.lock):
        if path.is_dir():
            raise ConfigError(
                f"output_dir: '{path}' is a folder, where the run keeps its file {path.name}; move it away or choose "
                "another output_dir"
            )


def check_run(cfg: RunConfig, run: RunDir, env: DistEnv, resume: str | None, stop_after: int | None) -> Path | None:
    """What the config points at, before anything is built: output folder, lock, an interrupted run, model files
    and image sizes, data, the checkpoint to resume, its saved config and the run's logs. Returns the checkpoint
    folder to resume from (or None)."""
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after: expected a whole number of steps >= 1, got {stop_after}")
    preflight.check_output_dir(run.path, "output_dir")
    check_run_files(run)
    if env.is_main:
        RunLock(run).check_free()
    if not resume:
        check_not_interrupted(run)
    check_model_files(cfg)
    check_image_sizes(cfg)
    for split in (cfg.data.split, cfg.data.eval_split):
        preflight.check_data(
            cfg.data.dataset, cfg.data.dir, split, data_fields("eval_" if split != cfg.data.split else "")
        )
    build_precision(cfg, env.device)
    if cfg.train.compile:
        preflight.check_compile(env.device)
    if cfg.method.cache_dir is not None:
        preflight.check_output_dir(cfg.method.cache_dir, "method.cache_dir")
    path = None
    if resume:
        path = ckpt.resolve_resume(run.path, resume)
        ckpt.check_checkpoint_files(path)
        ckpt.check_finetune_kind(path, cfg)
        ckpt.check_resume_files(path, cfg)
        check_resume_configs(cfg, run, path)
        if env.is_main:
            check_logs(run)
    unused = cfg.teacher_plan().unused
    if unused and env.is_main:
        logger.warning(
            "method %s does not distil from teacher(s) %s (their kind, or a method without teachers): not loaded",
            cfg.method.name,
            ", ".join(unused),
        )
    return path


def check_not_interrupted(run: RunDir) -> None:
    """A run without ``--resume`` must not start over an earlier one: an interrupted one (a checkpoint, no final
    model) or a finished one (``model.safetensors``), whose ``config.yaml``, logs, checkpoints and model would be
    replaced."""
    if run.is_finished():
        raise ConfigError(
            f"output_dir: '{run.path}' holds a finished run ({MODEL_FILE}); a new run there would replace it: "
            f"continue it with --resume latest (and more train.steps), or start a new run in another output_dir "
            f"(--set output_dir=...) or after removing '{run.path}'"
        )
    if run.has_checkpoint():
        latest = run.latest.read_text(errors="replace").strip()
        raise ConfigError(
            f"output_dir: '{run.path}' holds an interrupted run (checkpoint {latest}, no {MODEL_FILE}); continue it "
            f"with --resume latest, or start a new run in another output_dir (--set output_dir=...) or after "
            f"removing '{run.path}'"
        )


def check_model_files(cfg: RunConfig) -> None:
    """The student's and the method's teachers' architectures are known and their files readable."""
    models = [
        ("student", cfg.student),
        *((f"teachers.{name}", cfg.teachers[name]) for name in cfg.teacher_plan().kinds),
    ]
    for field, spec in models:
        preflight.check_model(
            spec.arch, spec.pretrained, f"{field}.arch", f"{field}.pretrained", trust_checkpoint=spec.trust_checkpoint
        )


def check_image_sizes(cfg: RunConfig) -> None:
    """Every teacher the method reads takes the student's image size (the teachers see the student's training
    images), as open_clip's configs give them; an architecture without a local config (``hf-hub:``) is checked
    once built (:func:`check_built_image_sizes`)."""
    student = preflight.model_image_size(cfg.student.arch)
    for name in cfg.teacher_plan().kinds:
        _check_same_size(cfg, name, student, preflight.model_image_size(cfg.teachers[name].arch))


def check_built_image_sizes(cfg: RunConfig, student_size: int, teachers: Mapping[str, nn.Module]) -> None:
    """:func:`check_image_sizes` on the built models (their towers' ``image_size``); nothing is written yet."""
    for name, teacher in teachers.items():
        if name in cfg.teachers:
            _check_same_size(cfg, name, student_size, tower_image_size(teacher))


def _check_same_size(cfg: RunConfig, name: str, student: int | None, teacher: int | None) -> None:
    if student is None or teacher is None or student == teacher:
        return
    arch = cfg.teachers[name].arch
    raise ConfigError(
        f"teachers.{name}.arch: {arch} takes {teacher} px images, the student (student.arch {cfg.student.arch}) "
        f"{student} px; the teachers see the student's training images, so every teacher needs the student's "
        f"image size (choose a {student} px teacher or a {teacher} px student)"
    )


def check_resume_configs(cfg: RunConfig, run: RunDir, checkpoint: Path) -> None:
    """The resumed run's config agrees with the run's saved ``config.yaml`` and, for a checkpoint of another run
    folder (``--resume <run>/checkpoints/step_N``), with that run's ``config.yaml``
    (:func:`mmtard.train.resume.check_resume`: only what a resume may change differs)."""
    if run.config.is_file():
        check_resume(load_config(run.config, field="output_dir"), cfg, run.config)
    source = checkpoint.parent.parent
    if checkpoint.parent.name != CHECKPOINTS_DIR or source.resolve() == run.path.resolve():
        return
    saved = RunDir(source).config
    if saved.is_file():
        check_resume(load_config(saved, field="--resume"), cfg, saved)


def check_logs(run: RunDir) -> None:
    """``metrics.jsonl`` and ``eval.jsonl``, which a resume rewrites up to its checkpoint's step, are readable:
    every line a JSON object with a whole-number ``step`` (a torn last line is dropped with a warning)."""
    for path in (run.metrics, run.eval_log):
        if not path.exists():
            continue
        try:
            records = read_jsonl(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--resume: cannot read '{path}' ({exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--resume: '{path}' line {exc.lineno} is not JSON ({exc.msg}: {bad_line(exc)!r}); only a torn last "
                "line is dropped by itself. Repair or remove that line (or remove the file: its records before the "
                "checkpoint are then lost) and resume again"
            ) from None
        for number, record in enumerate(records, start=1):
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                raise ConfigError(
                    f"--resume: '{path}' record {number} has no whole-number step ({str(record)[:60]}); repair or "
                    "remove it and resume again"
                )


def bad_line(exc: json.JSONDecodeError) -> str:
    """The start of the line ``exc`` points at."""
    start = exc.pos - exc.colno + 1
    return exc.doc[start:].split("\n", 1)[0][:60]
