"""The resume rule: what a resumed run may change in its saved ``config.yaml``, and the config it resumes with.

A resumed run takes its saved ``config.yaml`` with the ``--set`` overrides on top (:func:`resume_config`); the
trainer checks it once against the saved one before anything is built (:func:`check_resume`): only the fields
of :data:`RESUME_EXTENSIONS` may differ, and ``train.steps`` may only grow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmtard.errors import ConfigError
from mmtard.train.config import RunConfig
from mmtard.train.config_io import _build, apply_overrides, config_to_dict, load_config

#: What a resumed run may change in its saved ``config.yaml``: where things are and how the run is
#: operated, never what it computes, plus more steps (``train.steps`` may grow, never shrink).
RESUME_EXTENSIONS = (
    "output_dir",
    "device",
    "data.dir",
    "data.workers",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.on_nonfinite",
    "train.dist_timeout_s",
    "eval.every",
    "eval.batch_size",
    "eval.final",
    "method.cache_dir",  # where the clean teacher's logits are kept on disk, not what they are
)


def config_to_resume(given: RunConfig, saved_path: str | Path, overrides: Sequence[str]) -> tuple[RunConfig, list[str]]:
    """The config a resumed run uses (``mmtard train --resume``): the run's saved ``config.yaml`` with the ``--set``
    overrides (:func:`resume_config`) in ``given``'s output folder, and the fields in which ``given`` (read from
    ``--config``, which then only locates the run folder) differs from it and is not used."""
    saved = load_config(saved_path)
    resumed = dataclasses.replace(resume_config(saved, overrides), output_dir=given.output_dir)
    _check_cache_dir_stays(saved, resumed, saved_path)
    after = flat_fields(resumed)
    ignored = [k for k, v in flat_fields(given).items() if after.get(k) != v and k != "output_dir"]
    return resumed, ignored


def _check_cache_dir_stays(saved: RunConfig, resumed: RunConfig, saved_path: str | Path) -> None:
    """A run folder resumed somewhere else than where it was started (copied, received) writes inside itself: a
    saved ``method.cache_dir`` outside it is refused, asking for one (``--set method.cache_dir=...``).

    Raises:
        ConfigError: naming ``method.cache_dir``, the saved folder and the run folder.
    """
    cache = resumed.method.cache_dir
    started, here = Path(saved.output_dir).resolve(), Path(resumed.output_dir).resolve()
    if cache is None or started == here or cache != saved.method.cache_dir:
        return
    if here in Path(cache).resolve().parents:
        return
    raise ConfigError(
        f"method.cache_dir: the run was started in '{saved.output_dir}' with its teacher-logit cache in '{cache}' "
        f"({saved_path}); resumed in '{resumed.output_dir}', it would write there, outside the run folder. Give "
        f"--set method.cache_dir=FOLDER (e.g. {Path(resumed.output_dir) / 'logit-cache'}) to resume"
    )


def check_resume(saved: RunConfig, config: RunConfig, saved_path: str | Path = "config.yaml") -> None:
    """Refuse a resume whose config contradicts the run's saved one, except in :data:`RESUME_EXTENSIONS`.

    Raises:
        ConfigError: naming the first contradicting field, with both values.
    """
    before, after = flat_fields(saved), flat_fields(config)
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name == "train.steps" and new < old:
            raise ConfigError(
                f"train.steps: the run was started with {old} steps ({saved_path}); a resume may add steps, not "
                f"remove them (got {new})"
            )
        if name not in RESUME_EXTENSIONS:
            raise ConfigError(
                f"{name}: the run was started with {old!r} ({saved_path}); resuming it with {new!r} would change "
                f"the run. Resume without changing it, or start a new output_dir. A resume may change only "
                f"{', '.join(RESUME_EXTENSIONS)}"
            )


def resume_config(saved: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """The config of a resumed run: the run's saved ``config.yaml`` with the ``--set`` overrides on top
    (checked once, by :func:`check_resume`, when training starts)."""
    return _build(RunConfig, apply_overrides(config_to_dict(saved), overrides), "").validate()


def flat_fields(config: RunConfig) -> dict[str, Any]:
    """``{"train.steps": 100, "teachers.clean.arch": ..., ...}``: every leaf field by its dotted name."""

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict) and node:
            return {k: v for key, value in node.items() for k, v in walk(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    return walk(config_to_dict(config), "")
