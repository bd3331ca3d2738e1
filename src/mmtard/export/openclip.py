"""The open_clip export: the weights as open_clip names them, and the config open_clip's ``local-dir:`` reads.

The folder loads with open_clip alone, for any architecture (the tiny ones included, whose config is not
built into open_clip)::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:EXPORT_FOLDER")

and, for a built-in architecture, also as a checkpoint file::

    model = open_clip.create_model("ViT-B-32", pretrained="EXPORT_FOLDER/model.safetensors")
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mmtard.export.files import contiguous_copy, save_safetensors
from mmtard.export.hf import open_clip_model_config
from mmtard.fileio import atomic_write_text

OPEN_CLIP_WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # the name open_clip's local-dir: and hf-hub: loaders read
OPEN_CLIP_FILES = (OPEN_CLIP_WEIGHTS_FILE, OPEN_CLIP_CONFIG_FILE)


def check_open_clip_exportable(arch: str) -> None:
    """Any built-in open_clip architecture exports; ``hf-hub:`` / ``local-dir:`` names are refused."""
    open_clip_model_config(arch)


def write_open_clip_folder(arch: str, model: nn.Module, preprocess: dict, out: Path) -> list[Path]:
    """Write ``model.safetensors`` and ``open_clip_config.json`` (model and preprocess config) into ``out``.

    Returns:
        The paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / OPEN_CLIP_WEIGHTS_FILE, contiguous_copy(model.state_dict()))
    config = {"model_cfg": open_clip_model_config(arch), "preprocess_cfg": preprocess}
    atomic_write_text(out / OPEN_CLIP_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return [out / name for name in OPEN_CLIP_FILES]
