"""Preflight: the checks of the machine and the file system that run before a command builds or writes anything.

A run config is checked when it is loaded (:mod:`mmtard.train.config`); what it points at is checked
here: the device exists (:func:`mmtard.distributed.check_device`), the output folder can be written, model
files exist and are readable, data folders exist. Each check raises one :class:`ConfigError` naming the
field, so a refused command leaves the file system as it found it. Every command (``train``, ``eval``,
``demo``, ``export``) shares them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from mmtard.errors import ConfigError
from mmtard.models.loading import CHECKPOINT_SUFFIXES, RANDOM_INIT


def check_compile(device: torch.device, field: str = "train.compile") -> None:
    """``torch.compile`` can run on ``device``: TorchDynamo supports this Python, and Inductor has its
    compiler (Triton for CUDA, a C++ compiler for the CPU, ``CXX`` or ``g++``).

    Raises:
        ConfigError: naming ``field`` and what is missing.
    """
    import platform

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"{field}: torch.compile does not support Python {platform.python_version()} with torch "
            f"{torch.__version__}; set {field}=false"
        )
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(f"{field}: torch.compile on CUDA needs Triton (pip install triton); set {field}=false")
    elif device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except RuntimeError as exc:  # torch._inductor.exc.InvalidCxxCompiler
            raise ConfigError(
                f"{field}: torch.compile on the CPU needs a C++ compiler ({one_line(exc)}); install g++ or set "
                f"CXX, or set {field}=false"
            ) from None


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def check_output_dir(path: str | Path, field: str) -> Path:
    """``path`` is a folder that can be written, or can be created (its nearest existing parent is a
    writable folder). Nothing is created.

    Raises:
        ConfigError: the path is a file, or the folder (or the parent it would be created in) is not writable.
    """
    if str(path) == "":
        raise ConfigError(f"{field}: empty; give a folder (it would be the current folder)")
    path = Path(path)
    if path.is_symlink() and not path.exists():  # a dangling link: creating the folder would fail
        raise ConfigError(f"{field}: '{path}' is a link to '{os.readlink(path)}', which does not exist")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: '{path}' is a file, expected a folder (or a path where one can be created)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: cannot create '{path}': '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in '{existing}')"
        raise ConfigError(f"{field}: '{existing}' is not writable{where}; choose another folder")
    return path


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether ``pretrained`` names a file (as :func:`mmtard.models.load_clip` decides), not a tag."""
    return (
        Path(pretrained).exists() or pretrained.endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or "\\" in pretrained
    )


def check_model(
    arch: str, pretrained: str, arch_field: str, pretrained_field: str, *, trust_checkpoint: bool = False
) -> None:
    """The architecture is known and ``pretrained`` is ``none``, a tag, or a readable checkpoint file
    (:func:`mmtard.models.check_checkpoint_file`: only its header or pickled structure is read).

    Tags are left to the loader (open_clip knows them); ``hf-hub:`` ids name their own weights.
    """
    from mmtard.models import check_architecture, check_checkpoint_file

    with renamed_fields({"model": arch_field}):
        check_architecture(arch)
    if arch.startswith(("hf-hub:", "local-dir:")) or str(pretrained).lower() in RANDOM_INIT:
        return
    if is_checkpoint_path(str(pretrained)):
        check_checkpoint_file(pretrained, pretrained_field, trust_checkpoint=trust_checkpoint)


def model_image_size(arch: str) -> int | None:
    """The input size open_clip's config gives ``arch`` (None when it has no local config, e.g. hf-hub)."""
    import open_clip

    from mmtard.models import check_architecture

    check_architecture(arch)  # registers the tiny architectures
    config = open_clip.get_model_config(arch) or {}
    size = config.get("vision_cfg", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def check_data(dataset: str, data_dir: str | None, split: str, fields: dict[str, str], download: bool = False) -> None:
    """The dataset is registered, has ``split``, and its folder exists when it is read from files
    (:func:`mmtard.data.check_dataset_source`); errors name the command's own fields.

    Args:
        fields: the command's names of the data layer's fields, e.g. ``{"data_dir": "--data-dir",
            "dataset": "--dataset", "split": "--split"}``.
    """
    from mmtard.data import check_dataset_source

    with renamed_fields(fields):
        check_dataset_source(dataset, data_dir, split, download)


@contextlib.contextmanager
def renamed_fields(names: dict[str, str]) -> Iterator[None]:
    """Errors raised inside that start with a library field (``data_dir: ...``) start with the command's
    name for it instead (``--data-dir: ...`` or ``data.dir: ...``)."""
    try:
        yield
    except ConfigError as exc:
        if exc.field not in names:
            raise
        raise exc.renamed(names[exc.field]) from None
