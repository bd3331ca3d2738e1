"""mmtard: multimodal multi-teacher adversarial distillation for CLIP models."""

__version__ = "0.1.0"
