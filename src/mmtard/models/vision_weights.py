"""Image-tower files: the robust CLIP vision encoders the field publishes, put into a base open_clip model.

RobustVLM (FARE, TeCoA; Schlarmann et al., ICML 2024) and TeCoA (Mao et al., ICLR 2023) publish only the image
tower's state dict; their loaders build ``open_clip.create_model_and_transforms('ViT-B-32', pretrained='openai')``
and call ``model.visual.load_state_dict(sd)``. This module does the same for every format they use:

- a bare ``visual`` state dict (RobustVLM's ``.pt`` files);
- ``{'vision_encoder_state_dict': sd}`` (TeCoA), or ``{'state_dict': sd}``;
- either as ``.safetensors``;
- keys with a ``module.`` prefix (DataParallel) and/or a ``visual.`` prefix; a whole CLIP state dict gives
  its ``visual.*`` tensors (the text tower stays the base model's, with a warning).

A file is data, not code: it is checked by :func:`mmtard.models.check_checkpoint_file` and read with
``weights_only`` (a pickle that needs code execution is refused unless ``trust_checkpoint``).

``alpha`` interpolates in weight space between the base tower and the file's, as RobustVLM offers:
``alpha * file + (1 - alpha) * base`` for every floating-point tensor (1: the file's tower, the default;
0: the base tower).

Activation: OpenAI's weights were trained with QuickGELU, and the published towers over them too (RobustVLM
built them with open_clip 2, whose ``openai`` models used QuickGELU). open_clip 3 builds ``ViT-B-32`` with
GELU even with the ``openai`` tag, so :func:`quickgelu_name` gives the ``-quickgelu`` architecture that
:func:`mmtard.models.load_clip` builds instead, with a warning naming it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from mmtard.errors import ConfigError
from mmtard.models.checkpoint_file import CheckpointError, check_checkpoint_file, non_finite_tensors

__all__ = [
    "VISION_STATE_KEYS",
    "apply_vision_weights",
    "check_vision_alpha",
    "quickgelu_name",
    "read_vision_state_dict",
]

logger = logging.getLogger(__name__)

#: the keys a published file may hold its state dict under (TeCoA's first)
VISION_STATE_KEYS = ("vision_encoder_state_dict", "state_dict")
PREFIXES = ("module.", "visual.")
QUICKGELU_SUFFIX = "-quickgelu"
#: the pretrained tag whose weights were trained with QuickGELU
QUICKGELU_TAGS = ("openai",)
#: how many names or shapes an error lists before "and N more"
SHOWN = 3


def quickgelu_name(name: str, pretrained: str) -> str | None:
    """The ``-quickgelu`` architecture to build for a vision file over ``name`` with ``pretrained``, or None
    when ``name`` already has the activation the weights were trained with (or has no such variant)."""
    if str(pretrained).lower() not in QUICKGELU_TAGS or name.endswith(QUICKGELU_SUFFIX):
        return None
    candidate = name + QUICKGELU_SUFFIX
    return candidate if candidate in open_clip.list_models() else None


def check_vision_alpha(alpha: object, field: str = "vision_weights_alpha") -> float:
    """``alpha`` as a float in ``[0, 1]``.

    Raises:
        ConfigError: not a number in ``[0, 1]``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ConfigError(
            f"{field}: expected a number in [0, 1] (1: the file's tower, 0: the base tower), got {alpha!r}"
        )
    return float(alpha)


def read_vision_state_dict(
    path: str | Path, *, field: str = "vision_weights", trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """The image tower's tensors in ``path``, with open_clip's ``model.visual`` key names.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CheckpointError: an unreadable file, a pickle that needs code execution (without ``trust_checkpoint``),
            or a file that holds no image tower.
    """
    path = check_checkpoint_file(path, field, trust_checkpoint=trust_checkpoint)
    if path.suffix == ".safetensors":
        checkpoint = load_file(str(path))
    else:  # not open_clip's load_state_dict: it strips module. itself, so two names equal without it would merge
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    state = _unwrap(checkpoint)
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{field}: '{path}' holds no state dict (parameter name -> tensor) of an image tower")
    _refuse_names_equal_once_stripped(state, path, field)
    state = {_strip(str(k), "module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if visual and len(visual) < len(state):
        logger.warning(
            "%s: '%s' is a whole CLIP state dict; its image tower (%d visual.* tensors) is used, the other %d "
            "tensors are not",
            field,
            path,
            len(visual),
            len(state) - len(visual),
        )
    return visual or state


def _unwrap(checkpoint: object) -> object:
    """The innermost mapping under the state-dict keys; a mapping met twice (a file that holds itself under
    ``state_dict``) ends the walk, as would a real tower."""
    seen = set()
    while isinstance(checkpoint, Mapping) and id(checkpoint) not in seen:
        seen.add(id(checkpoint))
        inner = next((checkpoint[k] for k in VISION_STATE_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            return checkpoint
        checkpoint = inner
    return checkpoint


def _refuse_names_equal_once_stripped(state: Mapping, path: Path, field: str) -> None:
    """Two tensors whose names are equal without their ``module.`` prefixes (``module.visual.proj`` and
    ``visual.proj``): one of them would replace the other silently."""
    seen: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = _strip(str(key), "module.")
        if name in seen:
            raise CheckpointError(
                f"{field}: '{path}' holds both '{seen[name]}' and '{key}', the same tensor once the module. prefix "
                "is removed; keep one of them"
            )
        seen[name] = str(key)


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def apply_vision_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float = 1.0,
    arch: str = "the model",
    source: str = "",
    field: str = "vision_weights",
) -> None:
    """Load ``state_dict`` into ``model.visual`` (strictly: every tensor, each of its shape), interpolated
    with the base tower by ``alpha``.

    Raises:
        CheckpointError: tensors missing, extra, or of other shapes than ``arch``'s image tower; one line
            naming ``field``, the expected and the found shapes. Tensors holding NaN or inf, or bool / integer
            tensors where the tower has floating-point ones (they would be cast silently).
    """
    alpha = check_vision_alpha(alpha, f"{field} alpha")
    base = model.visual.state_dict()
    _check_tower_file(state_dict, base, arch, f"'{source}'" if source else "the file", field)
    mixed = {}
    for key, current in base.items():
        loaded = state_dict[key].to(device=current.device)
        if alpha != 1.0 and current.is_floating_point():
            loaded = (alpha * loaded.float() + (1 - alpha) * current.float()).to(current.dtype)
        mixed[key] = loaded
    with torch.no_grad():
        model.visual.load_state_dict(mixed, strict=True)


def _check_tower_file(
    state_dict: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], arch: str, where: str, field: str
) -> None:
    """``state_dict`` is a tower like ``base`` (``arch``'s image tower): floating-point where it is, finite, the
    same tensors and shapes.

    Raises:
        CheckpointError: one line naming ``field`` and the file (``where``) and what differs.
    """
    not_float = [
        f"{k} ({state_dict[k].dtype})"
        for k in base
        if k in state_dict and base[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if not_float:
        raise CheckpointError(
            f"{field}: {where} holds {len(not_float)} non-floating-point tensor(s) where {arch}'s image tower has "
            f"floating-point ones: {_listing(not_float)}; expected the tower's weights, not masks or counts"
        )
    non_finite = non_finite_tensors(state_dict)
    if non_finite:
        raise CheckpointError(
            f"{field}: {where} holds non-finite weights (NaN or inf in {len(non_finite)} tensor(s): "
            f"{_listing(non_finite)}); a diverged training run? Nothing was evaluated or written"
        )
    mismatched = [
        f"{k} is {_shape(state_dict[k])} in the file, {arch} expects {_shape(base[k])}"
        for k in base
        if k in state_dict and state_dict[k].shape != base[k].shape
    ]
    missing = [k for k in base if k not in state_dict]
    extra = [k for k in state_dict if k not in base]
    if mismatched:
        raise CheckpointError(
            f"{field}: {where} is not an image tower of {arch} ({len(mismatched)} tensors differ in shape: "
            f"{'; '.join(mismatched[:SHOWN])}{'; ...' if len(mismatched) > SHOWN else ''}); give a file made for "
            f"{arch}, or the --model it was made for"
        )
    if missing or extra:
        parts = [f"lacks {len(missing)} of its {len(base)} tensors ({_listing(missing)})"] if missing else []
        parts += [f"has {len(extra)} it does not ({_listing(extra)})"] if extra else []
        raise CheckpointError(
            f"{field}: {where} is not an image tower of {arch}: it {' and '.join(parts)}; expected open_clip's "
            "model.visual state dict"
        )
