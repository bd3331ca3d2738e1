"""Models: loading (names, tags, hf-hub, files: ``loading``), tiny architectures (``tiny``), the zero-shot
classifier and its text prototypes (``zeroshot``)."""

from mmtard.models.checkpoint_file import CheckpointError, CheckpointNotFoundError, check_checkpoint_file
from mmtard.models.loading import CLIPBundle, check_architecture, check_hub_id, load_checkpoint_into, load_clip
from mmtard.models.tiny import list_models, list_tiny_models
from mmtard.models.vision_weights import apply_vision_weights, read_vision_state_dict
from mmtard.models.zeroshot import (
    DEFAULT_LOGIT_SCALE,
    ZeroShotClassifier,
    build_zero_shot_classifier,
    text_prototypes,
)

__all__ = [
    "CLIPBundle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DEFAULT_LOGIT_SCALE",
    "ZeroShotClassifier",
    "apply_vision_weights",
    "build_zero_shot_classifier",
    "check_architecture",
    "check_checkpoint_file",
    "check_hub_id",
    "list_models",
    "list_tiny_models",
    "load_checkpoint_into",
    "load_clip",
    "read_vision_state_dict",
    "text_prototypes",
]
