"""Load CLIP models through open_clip: architecture names + pretrained tags, ``hf-hub:`` ids,
local checkpoint files, and random initialisation.

A checkpoint from the internet is data, not code: ``.safetensors`` files are read as tensors only, and
``.pt`` / ``.bin`` / ``.pth`` files go through ``torch.load(weights_only=True)``. A file that needs full
unpickling (it could run code on load) is refused unless ``trust_checkpoint=True``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn

from mmtard.errors import ConfigError
from mmtard.models.tiny import ensure_tiny_models_registered

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_INIT = ("none", "random", "")


class CheckpointError(ConfigError):
    """A checkpoint file could not be read safely or does not fit the architecture."""


@dataclass
class CLIPBundle:
    """An open_clip model with what is needed to use it on ``[0, 1]`` pixels.

    Attributes:
        model: the open_clip CLIP model (image and text towers).
        tokenizer: the matching open_clip tokenizer.
        name: architecture name or ``hf-hub:`` id as given.
        pretrained: pretrained tag, file path, or ``"none"``.
        mean: per-channel normalisation mean the image tower expects.
        std: per-channel normalisation std the image tower expects.
        image_size: input side length in pixels.

    The bundle also holds the text prototypes of every label set it was used with, filled by
    ``mmtard.models.zeroshot.text_prototypes`` (the text tower is frozen, so they are computed once).
    """

    model: nn.Module
    tokenizer: Callable
    name: str
    pretrained: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    _prototype_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _image_size(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _is_path_like(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or "\\" in pretrained


def check_architecture(name: str) -> None:
    """Raise a clear error for an architecture open_clip does not know."""
    ensure_tiny_models_registered()
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if name not in open_clip.list_models():
        known = (
            ", ".join(m for m in open_clip.list_models() if m.startswith("tiny-")) + ", ViT-B-32, ViT-L-14, RN50, ..."
        )
        raise ConfigError(
            f"model: unknown architecture '{name}'. Expected an open_clip name ({known}) or 'hf-hub:ORG/REPO'."
        )


def load_clip(
    name: str,
    pretrained: str | None = "none",
    *,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | None = None,
) -> CLIPBundle:
    """Create an open_clip model and load its weights.

    Args:
        name: open_clip architecture (``ViT-B-32``, ``tiny-vit-s``...) or ``hf-hub:ORG/REPO``.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a checkpoint file
            (``.safetensors``; ``.pt``/``.bin``/``.pth`` state dicts), or ``none`` for random weights.
            Ignored for ``hf-hub:`` ids, whose repository names the weights.
        device: where the model lives.
        trust_checkpoint: allow full unpickling of a ``.pt`` file. Only for files you made yourself.
        cache_dir: open_clip's download cache.

    Returns:
        The model in eval mode with its tokenizer and preprocessing constants.

    Raises:
        ConfigError: unknown architecture or pretrained tag.
        FileNotFoundError: a checkpoint path that does not exist.
        CheckpointError: a checkpoint that needs code execution to load, or that does not fit.
    """
    check_architecture(name)
    pretrained = "none" if pretrained is None else str(pretrained)
    is_hub = name.startswith(("hf-hub:", "local-dir:"))
    checkpoint: Path | None = None

    if is_hub:
        model = open_clip.create_model(name, device=device, cache_dir=cache_dir)
        pretrained = name
    elif pretrained.lower() in RANDOM_INIT:
        logger.warning("model %s: pretrained 'none', the weights are random (fine for tests, not for results)", name)
        model = open_clip.create_model(name, pretrained=None, device=device)
        pretrained = "none"
    elif Path(pretrained).exists() or _is_path_like(pretrained):
        checkpoint = Path(pretrained)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"pretrained: checkpoint file '{checkpoint}' does not exist")
        model = open_clip.create_model(name, pretrained=None, device=device)
        load_checkpoint_into(model, checkpoint, trust_checkpoint=trust_checkpoint)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(
                f"pretrained: '{pretrained}' is neither an existing file nor a pretrained tag of {name} "
                f"(tags: {', '.join(tags) or 'none'}). Use 'none' for random weights."
            )
        model = open_clip.create_model(name, pretrained=pretrained, device=device, cache_dir=cache_dir)

    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    return CLIPBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name, cache_dir=cache_dir) if is_hub else open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained if checkpoint is None else str(checkpoint),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        image_size=_image_size(model),
    )


def load_checkpoint_into(model: nn.Module, path: Path, *, trust_checkpoint: bool = False) -> None:
    """Load a CLIP state dict file into ``model`` through open_clip's converter.

    ``.safetensors`` holds tensors only. Other files are read with ``weights_only=True`` unless
    ``trust_checkpoint`` is set; a file that needs code execution to unpickle is refused.
    """
    try:
        open_clip.load_checkpoint(model, str(path), weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"pretrained: '{path}' is a pickle that needs code execution to load, so it was refused "
            "(a checkpoint from the internet is data, not code). Convert it to .safetensors, or pass "
            "--trust-checkpoint if you made this file yourself."
        ) from exc
    except (RuntimeError, AssertionError, KeyError) as exc:
        # open_clip reports a state dict of another architecture as size mismatches, missing keys or
        # failed shape assertions while resizing position embeddings.
        raise CheckpointError(f"pretrained: '{path}' does not fit this architecture: {exc}") from exc
