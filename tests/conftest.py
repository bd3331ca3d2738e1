"""Shared fixtures. Tests never download: HF_HUB_OFFLINE is set before open_clip is imported."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import CLASSES, REPO  # noqa: E402

CIFAR_DIR = Path(os.environ.get("MMTARD_CIFAR_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture
def cifar_dir() -> Path:
    """The shared CIFAR-10 npz folder; tests that need it skip with the reason when it is absent."""
    if not (CIFAR_DIR / "test.npz").is_file():
        pytest.skip(f"CIFAR-10 data not found at {CIFAR_DIR} (expected ../shared/data/cifar10 beside the repo)")
    return CIFAR_DIR


@pytest.fixture(scope="module", autouse=True)
def _remove_module_tmp_folders(request, tmp_path_factory):
    """Remove the folders a test module's fixtures made with tmp_path_factory once the module is done.

    pytest's retention policy "failed" (pyproject.toml) removes a passing test's own tmp_path, but not the
    folders of module-scoped fixtures, which hold the large checkpoints. They are kept when a test of the
    module failed, as pytest keeps a failing test's tmp_path.
    """
    basetemp = tmp_path_factory.getbasetemp()
    before = set(basetemp.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(basetemp.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_bundle():
    from mmtard.models import load_clip

    torch.manual_seed(0)
    return load_clip("tiny-vit-s", "none")


@pytest.fixture
def npz_dir(tmp_path):
    """A small learnable npz folder: each class a distinct colour plus noise."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 4)
    colours = rng.integers(0, 256, size=(10, 3))
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 20, size=(40, 32, 32, 3)), 0, 255).astype(np.uint8)
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez_compressed(folder / "test.npz", x=x, y=y)
    (folder / "classes.txt").write_text("\n".join(CLASSES))
    return folder
