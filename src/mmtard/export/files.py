"""File helpers of the export: safetensors written atomically with the usual permissions, and file digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from mmtard.fileio import atomic_path

SAFETENSORS_METADATA = {"format": "pt"}  # what transformers and open_clip expect of a PyTorch safetensors file


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically, readable like any other file the export writes.

    ``safetensors`` replaces the temporary file with one of mode 0600; the mode is set back from the umask.
    """
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=SAFETENSORS_METADATA)
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
