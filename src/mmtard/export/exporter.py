"""``export_model``: a run folder or checkpoint -> an open_clip or Hugging Face folder with its model card."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import open_clip
import torch
from torch import nn

from mmtard.errors import ConfigError
from mmtard.export.card import CARD_FILE, CardInput, read_results, render_card
from mmtard.export.hf import HF_FILES, check_hf_convertible, import_transformers, write_hf_folder
from mmtard.export.openclip import OPEN_CLIP_FILES, check_open_clip_exportable, write_open_clip_folder
from mmtard.export.source import ExportSource, preprocess_config, resolve_source
from mmtard.fileio import atomic_write_text, reported_write_errors
from mmtard.models import CLIPBundle, load_clip
from mmtard.models.checkpoint_file import non_finite_tensors
from mmtard.preflight import check_output_dir
from mmtard.provenance import git_commit
from mmtard.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    """One output format.

    Attributes:
        library_name: the library that loads it (the model card's ``library_name``).
        files: the files it writes, besides the model card.
        check: raises a ConfigError for an architecture it cannot hold, before any weights are read.
        write: ``(arch, model, preprocess, out) -> paths written``.
    """

    library_name: str
    files: tuple[str, ...]
    check: Callable[[str], object]
    write: Callable[[str, nn.Module, dict, Path], list[Path]]


def _check_hf(arch: str) -> None:
    check_hf_convertible(arch)
    import_transformers()


FORMATS: Registry[ExportFormat] = Registry("--format")
FORMATS.add("open_clip", ExportFormat("open_clip", OPEN_CLIP_FILES, check_open_clip_exportable, write_open_clip_folder))
FORMATS.add("hf", ExportFormat("transformers", HF_FILES, _check_hf, write_hf_folder))


def list_formats() -> list[str]:
    return FORMATS.names()


def _check_out_folder(out: Path, files: Sequence[str]) -> None:
    """Refuse a folder holding anything but the files this export writes (a re-export overwrites them)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: '{out}' is a file; give a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files) if out.is_dir() else []
    if foreign:
        raise ConfigError(
            f"--out: '{out}' already holds {', '.join(foreign[:5])}, which this export does not write; "
            "give a new or empty folder"
        )


def _versions(format_name: str) -> dict[str, str]:
    versions = {"torch": torch.__version__, "open_clip": open_clip.__version__}
    if format_name == "hf":
        versions["transformers"] = import_transformers().__version__
    return versions


def export_model(
    model: str,
    pretrained: str | Path,
    out: str | Path,
    *,
    format: str = "hf",
    results: Sequence[str | Path] = (),
    license: str | None = None,
    trust_checkpoint: bool = False,
    vision_weights: str | Path | None = None,
    vision_weights_alpha: float = 1.0,
) -> list[Path]:
    """Write a model as an open_clip or Hugging Face ``transformers`` folder with a model card.

    Args:
        model: the open_clip architecture (``ViT-B-32``, ``ViT-L-14-336``, ``tiny-vit-s``...).
        pretrained: a run folder (``model.safetensors`` + ``config.yaml``; its ``final_eval.json`` goes
            into the card), a checkpoint file, an open_clip pretrained tag, or ``none`` (random weights).
        out: the export folder; new, empty, or holding only a previous export of the same format.
        format: ``open_clip`` (``model.safetensors`` + ``open_clip_config.json``) or ``hf``
            (``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``).
        results: ``results.json`` files of ``mmtard eval`` whose tables go into the card.
        license: a license identifier for the card's metadata (left out when ``None``).
        trust_checkpoint: allow full unpickling of a ``.pt`` checkpoint (only for your own files).
        vision_weights: an image-tower file loaded into the image tower over ``pretrained`` (see
            :mod:`mmtard.models.vision_weights`); over ``openai`` the ``-quickgelu`` variant is written.
        vision_weights_alpha: its weight against the base tower, in weight space.

    Returns:
        The files written, the model card (``README.md``) last.

    Everything read (the run's ``config.yaml`` and ``final_eval.json``, the results files, the weights) is
    checked before anything is written; the files are written into a staging folder beside ``out`` and moved
    into it at the end, so a failure leaves ``out`` as it was.

    Raises:
        ConfigError: an unknown format, an architecture the format cannot hold (naming ``--model``), a
            run of another architecture, a malformed run or results file, non-finite weights, an ``out``
            folder with other files or that cannot be written, transformers missing for ``hf``.
        OutputWriteError: the disk is full or the folder read-only while writing (naming the file).
        FileNotFoundError: a missing checkpoint, run file or results file.
    """
    export_format = FORMATS.get(format)
    export_format.check(model)
    out = Path(out)
    check_output_dir(out, "--out")
    source = resolve_source(model, pretrained)  # the run's config.yaml and final_eval.json, read and checked
    results_read = [(Path(path), read_results(path)) for path in results]
    _check_out_folder(out, (*export_format.files, CARD_FILE))

    bundle, source = _load_checked(model, source, trust_checkpoint, vision_weights, vision_weights_alpha)
    written = _write_folder(out, format, export_format, bundle, source, results_read, license)
    logger.info("exported %s (%s) to %s", model, format, out)
    return written


def _load_checked(
    model: str,
    source: ExportSource,
    trust_checkpoint: bool,
    vision_weights: str | Path | None,
    vision_weights_alpha: float,
) -> tuple[CLIPBundle, ExportSource]:
    """The model loaded, its weights checked finite, and ``source`` naming the architecture built (a
    ``-quickgelu`` variant for a tower over ``openai``: the one written and described)."""
    bundle = load_clip(
        model,
        source.weights,
        trust_checkpoint=trust_checkpoint,
        vision_weights=vision_weights,
        vision_weights_alpha=vision_weights_alpha,
    )
    _check_finite_weights(bundle.model, source.weights)
    source = replace(
        source,
        arch=bundle.name,
        vision_weights=bundle.vision_weights,
        vision_weights_alpha=bundle.vision_weights_alpha if bundle.vision_weights is not None else None,
    )
    return bundle, source


def _write_folder(
    out: Path,
    format_name: str,
    export_format: ExportFormat,
    bundle: CLIPBundle,
    source: ExportSource,
    results: list[tuple[Path, list[dict]]],
    license: str | None,
) -> list[Path]:
    """The format's files and the model card, written into a staging folder whose files then replace ``out``'s
    (:func:`staged_folder`); the files in ``out``, the card last."""
    preprocess = preprocess_config(bundle, source.base_tag)
    with reported_write_errors("--out", out), staged_folder(out) as stage:
        files = export_format.write(bundle.name, bundle.model, preprocess, stage)
        card = CardInput(
            source=source,
            format_name=format_name,
            library_name=export_format.library_name,
            folder=out,
            files=files,
            preprocess=preprocess,
            results=results,
            license=license,
            versions=_versions(format_name),
            commit=git_commit(),
        )
        atomic_write_text(stage / CARD_FILE, render_card(card))
    return [out / f.name for f in files] + [out / CARD_FILE]


def _is_inside(file: str | Path, folder: Path) -> bool:
    return Path(os.path.abspath(file)).parent == Path(os.path.abspath(folder))


def _check_finite_weights(model: nn.Module, weights: str) -> None:
    """Refuse weights holding NaN or inf (a diverged run): an export of them would load and give NaN.

    Raises:
        ConfigError: naming ``--pretrained``, the file and the first tensors concerned.
    """
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ConfigError(
            f"--pretrained: '{weights}' holds non-finite weights (NaN or inf in {len(bad)} tensor(s): "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); a diverged run? Nothing was exported"
        )


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write the export into; on success its files move into ``out``
    (renamed, so a previous export there is replaced file by file only once every new file is whole). On any
    error the staging folder, and every folder this call created for ``out``, are removed: a failed export
    (a full disk) leaves no partial folder and a previous export as it was."""
    new_top = out if not out.exists() else None
    while new_top is not None and not new_top.parent.exists():
        new_top = new_top.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    except OSError as exc:  # name the folder asked for, not the staging folder
        if new_top is not None:
            shutil.rmtree(new_top, ignore_errors=True)
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    try:
        yield stage
        if out.exists():
            for file in stage.iterdir():
                os.replace(file, out / file.name)
            stage.rmdir()
        else:
            os.rename(stage, out)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if new_top is not None:
            shutil.rmtree(new_top, ignore_errors=True)
        if isinstance(exc, OSError) and exc.filename is not None and _is_inside(exc.filename, stage):
            raise OSError(exc.errno, exc.strerror, str(out / Path(exc.filename).name)) from exc  # the file meant
        raise
