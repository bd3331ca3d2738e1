"""Shared fixtures. Tests never download: HF_HUB_OFFLINE is set before open_clip is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("MMTARD_CIFAR_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture
def cifar_dir() -> Path:
    """The shared CIFAR-10 npz folder; tests that need it skip with the reason when it is absent."""
    if not (CIFAR_DIR / "test.npz").is_file():
        pytest.skip(f"CIFAR-10 data not found at {CIFAR_DIR} (expected ../shared/data/cifar10 beside the repo)")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def tiny_bundle():
    from mmtard.models import load_clip

    torch.manual_seed(0)
    return load_clip("tiny-vit-s", "none")
