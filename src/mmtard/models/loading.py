"""Load CLIP models through open_clip: architecture names + pretrained tags, ``hf-hub:`` ids,
local checkpoint files, and random initialisation.

A checkpoint from the internet is data, not code: ``.safetensors`` files are read as tensors only, and
``.pt`` / ``.bin`` / ``.pth`` files go through ``torch.load(weights_only=True)``. A file that needs full
unpickling (it could run code on load) is refused unless ``trust_checkpoint=True``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from mmtard.errors import ConfigError
from mmtard.models.checkpoint_file import CheckpointError, CheckpointNotFoundError, check_checkpoint_file
from mmtard.models.tiny import ensure_tiny_models_registered
from mmtard.models.vision_weights import (
    apply_vision_weights,
    check_vision_alpha,
    quickgelu_name,
    read_vision_state_dict,
)

__all__ = [
    "CLIPBundle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "check_architecture",
    "check_checkpoint_file",
    "check_hub_id",
    "load_checkpoint_into",
    "load_clip",
]

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_INIT = ("none", "random", "")
HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HUB_CONFIG_FILE = "open_clip_config.json"
HUB_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
#: the weights files open_clip prefers in a local-dir: folder, in its order
LOCAL_WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
OPEN_CLIP_RANDOM_INIT_WARNING = "No pretrained weights loaded"


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
        vision_weights: the image-tower file loaded over ``pretrained`` (``None``: none).
        vision_weights_alpha: its weight against the base tower (1: the file's tower).

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
    vision_weights: str | None = None
    vision_weights_alpha: float = 1.0
    _prototype_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def frozen_copy(self) -> CLIPBundle:
        """A copy of this bundle whose model is a deep copy in eval mode without parameter gradients (FARE's and
        PMG-AFT's frozen original model); the text prototypes computed so far are shared, as the text tower is."""
        model = copy.deepcopy(self.model).eval().requires_grad_(False)
        return dataclasses.replace(self, model=model, _prototype_cache=dict(self._prototype_cache))


def tower_image_size(model: nn.Module) -> int | None:
    """The input size of a model's image tower (``model.visual.image_size``), None when it does not say."""
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if size else None


def _image_size(model: nn.Module) -> int:
    return tower_image_size(model) or 224


def _is_path_like(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or "\\" in pretrained


def check_architecture(name: str) -> None:
    """Raise a clear error for an architecture open_clip does not know."""
    ensure_tiny_models_registered()
    if name.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return
    if name not in open_clip.list_models():
        known = (
            ", ".join(m for m in open_clip.list_models() if m.startswith("tiny-")) + ", ViT-B-32, ViT-L-14, RN50, ..."
        )
        raise ConfigError(
            f"model: unknown architecture '{name}'. Expected an open_clip name ({known}) or 'hf-hub:ORG/REPO'."
        )


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(hub_constants.HF_HUB_OFFLINE) or flag in {"1", "ON", "YES", "TRUE"}


def check_hub_id(name: str, cache_dir: str | None = None, field: str = "model") -> None:
    """Check an ``hf-hub:ORG/REPO`` or ``local-dir:PATH`` model before open_clip is asked to build it.

    Offline (``HF_HUB_OFFLINE=1``), the repository's config and weights must be in the Hugging Face cache;
    a ``local-dir:`` must be a folder. The weights file found (in the folder, or cached) is checked as any
    checkpoint file is (:func:`check_checkpoint_file`: whole, a state dict, no pickled code).

    Raises:
        ConfigError: the id is empty, not cached while offline, or the folder does not exist.
        CheckpointError: its weights file is unreadable, truncated, or a pickle that needs code execution.
    """
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :])
        if not folder.is_dir():
            raise ConfigError(f"{field}: '{name}': '{folder}' is not a folder (expected {HUB_CONFIG_FILE} and weights)")
        found = [folder / f for f in LOCAL_WEIGHTS_FILES if (folder / f).is_file()]
        if found:
            check_checkpoint_file(found[0], field)
        return
    repo_id = name[len(HUB_PREFIX) :]
    if not repo_id:
        raise ConfigError(f"{field}: '{name}' names no repository; expected hf-hub:ORG/REPO")
    if not _hub_offline():
        return
    config = try_to_load_from_cache(repo_id, HUB_CONFIG_FILE, cache_dir=cache_dir)
    weights = [try_to_load_from_cache(repo_id, f, cache_dir=cache_dir) for f in HUB_WEIGHTS_FILES]
    if not isinstance(config, str) or not any(isinstance(w, str) for w in weights):
        missing = "its config" if not isinstance(config, str) else "its weights"
        raise ConfigError(
            f"{field}: '{name}': offline (HF_HUB_OFFLINE=1), this id is not cached ({missing} missing); "
            "run once with internet access, or give a local checkpoint file with --pretrained"
        )
    check_checkpoint_file(next(w for w in weights if isinstance(w, str)), field)


class _DropOpenClipRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(OPEN_CLIP_RANDOM_INIT_WARNING)


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (it logs on the root logger):
    a checkpoint file is loaded right after, and random weights have the project's own warning."""
    root = logging.getLogger()
    quiet = _DropOpenClipRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _create_unloaded_model(name: str, device: str | torch.device) -> nn.Module:
    with _quiet_random_init():
        return open_clip.create_model(name, pretrained=None, device=device)


def load_clip(
    name: str,
    pretrained: str | None = "none",
    *,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | None = None,
    field: str = "pretrained",
    vision_weights: str | Path | None = None,
    vision_weights_alpha: float = 1.0,
    vision_field: str = "vision_weights",
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
        field: the flag or config field ``pretrained`` came from; error messages start with it.
        vision_weights: an image-tower file (RobustVLM's FARE / TeCoA ``.pt``, TeCoA's
            ``vision_encoder_state_dict``, ``.safetensors``; see :mod:`mmtard.models.vision_weights`) loaded
            into ``model.visual`` over ``pretrained``. Over an ``openai`` tag, an architecture with a
            ``-quickgelu`` variant is built as that variant (the activation the weights were trained with),
            with a warning; the bundle's ``name`` is the variant.
        vision_weights_alpha: ``alpha * file + (1 - alpha) * base`` in weight space (1: the file's tower).
        vision_field: the flag or config field ``vision_weights`` came from.

    Returns:
        The model in eval mode with its tokenizer and preprocessing constants.

    Raises:
        ConfigError: unknown architecture or pretrained tag, or an ``hf-hub:`` id that is not cached while
            offline.
        CheckpointNotFoundError: a checkpoint path that does not exist (also a ``FileNotFoundError``).
        CheckpointError: a folder, an unreadable, truncated or corrupt file, a checkpoint that needs code
            execution to load, or one that does not fit the architecture.
    """
    check_architecture(name)
    pretrained = "none" if pretrained is None else str(pretrained)
    vision_state = None
    if vision_weights is not None:
        check_vision_alpha(vision_weights_alpha, f"{vision_field}_alpha")
        vision_state = read_vision_state_dict(vision_weights, field=vision_field, trust_checkpoint=trust_checkpoint)
        name = _trained_activation(name, pretrained, vision_field)
    model, pretrained = _create_model(name, pretrained, device, cache_dir, field, trust_checkpoint)
    if vision_state is not None:
        source = str(vision_weights)
        apply_vision_weights(
            model, vision_state, alpha=vision_weights_alpha, arch=name, source=source, field=vision_field
        )
    return _bundle(model.eval(), name, pretrained, cache_dir, vision_weights, vision_weights_alpha)


def _bundle(
    model: nn.Module,
    name: str,
    pretrained: str,
    cache_dir: str | None,
    vision_weights: str | Path | None,
    vision_weights_alpha: float,
) -> CLIPBundle:
    """The bundle of a loaded model: its tokenizer and the preprocessing constants open_clip gives it."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    is_hub = name.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX))
    return CLIPBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name, cache_dir=cache_dir) if is_hub else open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        image_size=_image_size(model),
        vision_weights=None if vision_weights is None else str(vision_weights),
        vision_weights_alpha=float(vision_weights_alpha),
    )


def _trained_activation(name: str, pretrained: str, vision_field: str) -> str:
    """The architecture to build under a published image tower: the ``-quickgelu`` variant over an ``openai`` tag
    where one exists (with a warning), else ``name``."""
    variant = quickgelu_name(name, pretrained)
    if variant is None:
        return name
    logger.warning(
        "%s: %s's '%s' weights were trained with QuickGELU, and so were the image towers published over "
        "them; building %s (name it to silence this warning)",
        vision_field,
        name,
        pretrained,
        variant,
    )
    return variant


def _create_model(
    name: str, pretrained: str, device: str | torch.device, cache_dir: str | None, field: str, trust_checkpoint: bool
) -> tuple[nn.Module, str]:
    """The model of ``name`` with the weights ``pretrained`` names (see :func:`load_clip`), and what its bundle
    records as ``pretrained``: the ``hf-hub:`` id, ``none``, the checkpoint file or the tag."""
    if name.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return _create_hub_model(name, device, cache_dir), name
    if pretrained.lower() in RANDOM_INIT:
        logger.warning("model %s: pretrained 'none', the weights are random (fine for tests, not for results)", name)
        return _create_unloaded_model(name, device), "none"
    if Path(pretrained).exists() or _is_path_like(pretrained):
        checkpoint = check_checkpoint_file(pretrained, field, trust_checkpoint=trust_checkpoint)
        model = _create_unloaded_model(name, device)
        load_checkpoint_into(model, checkpoint, trust_checkpoint=trust_checkpoint, field=field)
        return model, str(checkpoint)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(
            f"{field}: '{pretrained}' is neither an existing file nor a pretrained tag of {name} "
            f"(tags: {', '.join(tags) or 'none'}). Use 'none' for random weights."
        )
    return _create_tagged_model(name, pretrained, device, cache_dir, field), pretrained


def _create_hub_model(name: str, device: str | torch.device, cache_dir: str | None) -> nn.Module:
    check_hub_id(name, cache_dir)
    try:
        return open_clip.create_model(name, device=device, cache_dir=cache_dir)
    except (RuntimeError, ValueError, OSError, AssertionError) as exc:
        if isinstance(exc, AssertionError) or "Error(s) in loading state_dict" in str(exc):  # another width or model
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"model: '{name}': its weights do not fit its config ({detail})") from exc
        if not _is_fetch_error(exc):
            raise
        raise ConfigError(f"model: cannot load '{name}': {_first_line(exc)}") from exc


def _create_tagged_model(
    name: str, tag: str, device: str | torch.device, cache_dir: str | None, field: str
) -> nn.Module:
    try:
        return open_clip.create_model(name, pretrained=tag, device=device, cache_dir=cache_dir)
    except RuntimeError as exc:
        if not _is_fetch_error(exc):
            raise
        offline = " (offline: HF_HUB_OFFLINE=1, and they are not cached)" if _hub_offline() else ""
        raise ConfigError(
            f"{field}: cannot get the weights of tag '{tag}' for {name}{offline}: {_first_line(exc)}"
        ) from exc


#: how open_clip's messages start when it could not fetch or read a model's config or weights
OPEN_CLIP_FETCH_ERRORS = (
    "Failed initial config/weights load",
    "Failed to download",
    "Could not load valid config",
    "'local-dir:' specified",
)


def _is_fetch_error(exc: BaseException) -> bool:
    return str(exc).startswith(OPEN_CLIP_FETCH_ERRORS)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def load_checkpoint_into(
    model: nn.Module, path: Path, *, trust_checkpoint: bool = False, field: str = "pretrained"
) -> None:
    """Load a CLIP state dict file into ``model`` through open_clip's converter.

    ``.safetensors`` holds tensors only. Other files are read with ``weights_only=True`` unless
    ``trust_checkpoint`` is set; a file that needs code execution to unpickle is refused. Call
    :func:`check_checkpoint_file` first for a precise error on unreadable files.
    """
    try:
        open_clip.load_checkpoint(model, str(path), weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{field}: '{path}' is a pickle that needs code execution to load, so it was refused "
            "(a checkpoint from the internet is data, not code). Convert it to .safetensors, or pass "
            "--trust-checkpoint if you made this file yourself."
        ) from exc
    except (RuntimeError, AssertionError, KeyError) as exc:
        # open_clip reports a state dict of another architecture as size mismatches, missing keys or
        # failed shape assertions while resizing position embeddings.
        raise CheckpointError(f"{field}: '{path}' does not fit this architecture: {exc}") from exc
