"""Zero-shot classifier: ``[0, 1]`` pixels -> class logits, so any attack works on any CLIP model.

``z(x) = s * normalize(f(norm(x))) @ T^T`` with ``f`` the image tower, ``norm`` the model's own mean/std
normalisation, ``T`` the ``(K, D)`` cached text prototypes ``t_k = normalize(mean_j normalize(g(p_j(c_k))))``
and ``s`` the logit scale (spec section 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.errors import ConfigError
from mmtard.models.loading import CLIPBundle

DEFAULT_LOGIT_SCALE = 100.0
#: classes whose prompts go through the text tower in one batch
PROTOTYPE_CLASSES_PER_BATCH = 10


@torch.no_grad()
def text_prototypes(bundle: CLIPBundle, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(K, D)`` class prototypes ``t_k = normalize(mean_j normalize(g(p_j(c_k))))`` (spec section 1).

    ``g`` is the text tower and ``p_j(c_k)`` template ``j`` filled with class name ``c_k``. The text tower is
    frozen, so the prototypes of a label set are computed once per bundle and cached on it.
    """
    key = (tuple(classnames), tuple(templates))
    cache = bundle._prototype_cache
    if key not in cache:
        was_training = bundle.model.training
        bundle.model.eval()
        weights = open_clip.build_zero_shot_classifier(
            bundle.model,
            bundle.tokenizer,
            classnames=list(classnames),
            templates=list(templates),
            num_classes_per_batch=PROTOTYPE_CLASSES_PER_BATCH,
            device=bundle.device,
        )
        bundle.model.train(was_training)
        cache[key] = weights.T.float().contiguous()
    return cache[key]


class ZeroShotClassifier(nn.Module):
    """Image tower + normalisation + fixed class prototypes.

    Args:
        visual: the image tower (``model.visual`` of an open_clip CLIP); shared, not copied, so a
            student's classifier trains its tower.
        mean: per-channel mean of the tower's normalisation.
        std: per-channel std of the tower's normalisation.
        prototypes: ``(K, D)`` L2-normalised class prototypes.
        logit_scale: ``s`` in ``z = s * e @ T^T``.
    """

    def __init__(
        self,
        visual: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        prototypes: torch.Tensor,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
    ):
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("prototypes", prototypes.detach().clone(), persistent=False)
        self.logit_scale = float(logit_scale)

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding ``f(norm(x))``, shape ``(B, D)``."""
        return self.visual((x - self.mean) / self.std)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(features.float(), dim=-1)
        return self.logit_scale * embedding @ self.prototypes.float().T

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``e(x) = normalize(f(norm(x)))``, shape ``(B, D)``."""
        return F.normalize(self.features(x).float(), dim=-1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Logits ``(B, K)``; with ``return_features`` the unnormalised embedding ``(B, D)`` instead.

        Both go through ``forward`` so that a DistributedDataParallel wrapper sees every training pass.
        """
        features = self.features(x)
        return features if return_features else self.logits_from_features(features)


#: the largest logit scale a float32 logit holds (the cosine is at most 1)
MAX_LOGIT_SCALE = float(torch.finfo(torch.float32).max)


def check_logit_scale(logit_scale: float | str, field: str = "logit_scale") -> float | str:
    """``"model"``, or the scale as a positive finite float.

    Raises:
        ConfigError: anything else (text, zero, negative, NaN, inf, beyond float32's range).
    """
    if logit_scale == "model":
        return "model"
    try:
        value = float(logit_scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(logit_scale, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{field}: expected a positive number or 'model', got {logit_scale!r}")
    if value > MAX_LOGIT_SCALE:
        raise ConfigError(
            f"{field}: {logit_scale!r} is beyond float32's range (at most {MAX_LOGIT_SCALE:.4g}), so every logit "
            "would be infinite; CLIP's own scale is 100"
        )
    return value


def resolve_logit_scale(bundle: CLIPBundle, logit_scale: float | str) -> float:
    """``logit_scale`` is a number (default 100, the released script's) or ``"model"`` for the learned one."""
    if check_logit_scale(logit_scale) == "model":
        return float(bundle.model.logit_scale.detach().exp().item())
    return float(logit_scale)


def build_zero_shot_classifier(
    bundle: CLIPBundle,
    classnames: Sequence[str],
    templates: Sequence[str],
    logit_scale: float | str = DEFAULT_LOGIT_SCALE,
) -> ZeroShotClassifier:
    """The zero-shot classifier of ``bundle`` for one label set (prototypes cached on the bundle)."""
    prototypes = text_prototypes(bundle, classnames, templates)
    return ZeroShotClassifier(
        bundle.model.visual, bundle.mean, bundle.std, prototypes, resolve_logit_scale(bundle, logit_scale)
    ).to(bundle.device)
