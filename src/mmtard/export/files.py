"""File helpers of the export: safetensors written atomically with the usual permissions, file digests, and the
evaluation records (``results.json``, ``final_eval.json``) read and checked before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from mmtard.errors import ConfigError
from mmtard.fileio import atomic_path

SAFETENSORS_METADATA = {"format": "pt"}  # what transformers and open_clip expect of a PyTorch safetensors file


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically, readable like any other file the export writes.

    ``safetensors`` replaces the temporary file with one of mode 0600; the mode is set back from the umask. An
    I/O error of safetensors (a full disk) is an ``OSError`` of its errno naming ``path``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=SAFETENSORS_METADATA)
        except SafetensorError as exc:  # its I/O errors carry the OS's code only in the text: "(os error 28)"
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from exc
        tmp.chmod(0o666 & ~umask)


def contiguous_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of a state dict's tensors (what safetensors can write)."""
    return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state.items()}


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, field: str) -> object:
    """The JSON value of ``path``; a file that is not UTF-8 JSON is one ConfigError naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field}: '{path}' is not JSON ({' '.join(str(exc).split())})") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(record: object, path: Path, field: str) -> None:
    """An evaluation record (``results.json`` or ``final_eval.json``) has what the card's table reads: a
    numeric ``clean_acc``, ``robust`` entries with a numeric ``acc``, and ``checks`` as a mapping.

    Raises:
        ConfigError: naming ``field`` and ``path``, and the first value that is missing or of the wrong type.
    """
    problem = None
    if not isinstance(record, dict):
        problem = f"holds a {type(record).__name__}, expected an evaluation record (a JSON object)"
    elif not _is_number(record.get("clean_acc")):
        problem = f"has clean_acc {record.get('clean_acc')!r}, expected a number"
    elif not isinstance(record.get("robust") or [], list):
        problem = f"has robust {record.get('robust')!r}, expected a list of attacks"
    elif any(not isinstance(entry, dict) or not _is_number(entry.get("acc")) for entry in record.get("robust") or []):
        problem = "has a robust entry without a numeric acc"
    elif not isinstance(record.get("checks") or {}, dict):
        problem = f"has checks {record.get('checks')!r}, expected a mapping"
    elif not isinstance((record.get("checks") or {}).get("warnings") or [], list):
        problem = "has checks.warnings that is not a list"
    if problem:
        raise ConfigError(f"{field}: '{path}' {problem}")
