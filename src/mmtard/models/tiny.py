"""Tiny open_clip architectures for 32 px images, registered under names usable anywhere a real one is.

The architectures are data: ``configs/*.json`` beside this file, in open_clip's model-config format.

| name         | image | patch | vision width x layers | text width x layers | embed dim |
|--------------|-------|-------|-----------------------|---------------------|-----------|
| tiny-vit-s   | 32    | 4     | 128 x 4               | 128 x 3             | 128       |
| tiny-vit-m   | 32    | 4     | 192 x 4               | 192 x 3             | 192       |
| tiny-vit-l   | 32    | 4     | 256 x 6               | 256 x 4             | 256       |
"""

from __future__ import annotations

from pathlib import Path

import open_clip

TINY_CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def ensure_tiny_models_registered() -> None:
    """Add this package's architectures to open_clip's registry (once)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(TINY_CONFIG_DIR)
        _registered = True


def list_models() -> list[str]:
    """Every architecture name ``load_clip`` accepts (open_clip's and the tiny ones)."""
    ensure_tiny_models_registered()
    return open_clip.list_models()


def list_tiny_models() -> list[str]:
    """The tiny architecture names, sorted."""
    return sorted(p.stem for p in TINY_CONFIG_DIR.glob("*.json"))
