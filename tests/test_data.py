"""Dataset registry, loaders, class subsets, balanced samples and input errors."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmtard.data import (
    DataNotFoundError,
    balanced_subset,
    check_dataset_source,
    create_dataset,
    list_datasets,
    resolve_classes,
)
from mmtard.data.metadata import imagenet_classnames, imagenet_templates
from mmtard.errors import ConfigError, MissingExtraError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_npz(folder, n_per_class=6, classes=CIFAR10, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(classes)), n_per_class)
    x = rng.integers(0, 256, size=(len(y), size, size, 3), dtype=np.uint8)
    np.savez_compressed(folder / "test.npz", x=x, y=y)
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return x, y


def test_registry_has_the_protocol_datasets():
    protocol = {
        "imagenet",
        "cifar10",
        "cifar100",
        "stl10",
        "cars",
        "caltech101",
        "pets",
        "flowers",
        "dtd",
        "eurosat",
        "fgvc_aircraft",
        "pcam",
        "imagenet-r",
        "imagenet_sketch",
    }
    assert protocol <= set(list_datasets())


def test_imagenet_metadata_comes_from_open_clip():
    assert len(imagenet_classnames()) == 1000
    templates = imagenet_templates()
    assert len(templates) == 80 and all("{}" in t for t in templates)


def test_npz_folder_loads_as_unit_range_images(tmp_path):
    x, y = _write_npz(tmp_path / "d")
    ds = create_dataset("cifar10", tmp_path / "d", image_size=32)
    image, label, index = ds[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(x[7]).permute(2, 0, 1).float() / 255)
    assert label == y[7] and index == 7
    assert ds.classnames == CIFAR10
    assert len(ds.templates) == 18 and all("{}" in t for t in ds.templates)


def test_resize_to_model_size(tmp_path):
    _write_npz(tmp_path / "d", n_per_class=1)
    image = create_dataset("cifar10", tmp_path / "d", image_size=224)[0][0]
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1


def test_seen_unseen_and_named_classes(tmp_path):
    _write_npz(tmp_path / "d")
    seen = create_dataset("cifar10", tmp_path / "d", image_size=32, classes="seen")
    unseen = create_dataset("cifar10", tmp_path / "d", image_size=32, classes="unseen")
    assert seen.classnames == ["airplane", "automobile", "bird", "cat", "deer"]
    assert unseen.classnames == ["dog", "frog", "horse", "ship", "truck"]
    assert set(unseen.labels.tolist()) == set(range(5))
    named = create_dataset("cifar10", tmp_path / "d", image_size=32, classes="ship,cat")
    assert named.classnames == ["ship", "cat"] and len(named) == 12
    assert resolve_classes(["truck"], CIFAR10) == [9]


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    a, b = balanced_subset(labels, 31), balanced_subset(labels, 31)
    assert torch.equal(a, b)
    assert torch.bincount(labels[a]).tolist() == [11, 10, 10]


def test_samples_option(tmp_path):
    _write_npz(tmp_path / "d")
    ds = create_dataset("cifar10", tmp_path / "d", image_size=32, samples=20)
    assert len(ds) == 20 and torch.bincount(ds.labels).tolist() == [2] * 10


def test_class_list_that_does_not_match_the_data(tmp_path):
    _write_npz(tmp_path / "d")
    with pytest.raises(ConfigError, match="classnames: 3 class names"):
        create_dataset("cifar10", tmp_path / "d", image_size=32, classnames=["a", "b", "c"])
    (tmp_path / "d" / "classes.txt").write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="one name per label"):
        create_dataset("cifar10", tmp_path / "d", image_size=32)


def test_unknown_class_name_and_dataset(tmp_path):
    _write_npz(tmp_path / "d")
    with pytest.raises(ConfigError, match="classes: \\['zebra'\\]"):
        create_dataset("cifar10", tmp_path / "d", image_size=32, classes="zebra")
    with pytest.raises(ConfigError, match="unknown dataset 'mnist2'"):
        create_dataset("mnist2", tmp_path, image_size=32)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_dataset("npz", tmp_path / "absent", image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="test.npz"):
        create_dataset("npz", tmp_path / "empty", image_size=32)


def test_image_folder_and_corrupt_image(tmp_path):
    for name, color in (("cat", 10), ("dog", 200)):
        folder = tmp_path / "test" / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 48, 3), color, dtype=np.uint8)).save(folder / f"{i}.png")
    ds = create_dataset("imagefolder", tmp_path, image_size=32)
    assert ds.classnames == ["cat", "dog"] and len(ds) == 4
    assert ds[3][0].shape == (3, 32, 32) and ds[3][1] == 1
    (tmp_path / "test" / "dog" / "2.jpg").write_bytes(b"not an image")
    ds = create_dataset("imagefolder", tmp_path, image_size=32)
    with pytest.raises(ConfigError, match="2.jpg' cannot be decoded"):
        ds[4]


def test_digits_ship_with_scikit_learn():
    train = create_dataset("digits", None, split="train", image_size=32)
    test = create_dataset("digits", None, split="test", image_size=32)
    assert len(train) + len(test) == 1797 and train.classnames == [str(i) for i in range(10)]


def test_real_cifar10_seen_split(cifar_dir):
    ds = create_dataset("cifar10", cifar_dir, split="test", image_size=32, classes="seen", samples=100)
    assert ds.classnames == CIFAR10[:5] and torch.bincount(ds.labels).tolist() == [20] * 5


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # the import fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"sklearn: not installed.*mmtard\[demo\]"):
        create_dataset("digits", None, image_size=32)


def test_npz_takes_any_split_name(tmp_path):
    """A CIFAR-10-C style folder: one npz file per corruption, read with split=<corruption>."""
    x, y = _write_npz(tmp_path / "c", n_per_class=2)
    (tmp_path / "c" / "test.npz").rename(tmp_path / "c" / "gaussian_noise.npz")
    ds = create_dataset("npz", tmp_path / "c", split="gaussian_noise", image_size=32)
    assert len(ds) == 20 and ds.classnames == CIFAR10
    torch.testing.assert_close(ds[3][0], torch.from_numpy(x[3]).permute(2, 0, 1).float() / 255)
    with pytest.raises(FileNotFoundError, match="no 'fog.npz' .*gaussian_noise.npz"):
        create_dataset("npz", tmp_path / "c", split="fog", image_size=32)
    for bad in ("../c/gaussian_noise", "", ".hidden"):
        with pytest.raises(ConfigError, match="split: expected a plain name"):
            create_dataset("npz", tmp_path / "c", split=bad, image_size=32)
    with pytest.raises(ConfigError, match="split: dataset cifar10 has splits"):
        create_dataset("cifar10", tmp_path / "c", split="gaussian_noise", image_size=32)


def test_more_samples_than_images_is_said(tmp_path, caplog):
    _write_npz(tmp_path / "d", n_per_class=2)
    with caplog.at_level(logging.WARNING, logger="mmtard.data.registry"):
        ds = create_dataset("cifar10", tmp_path / "d", image_size=32, classes="seen", samples=50)
    assert len(ds) == 10
    assert "samples: 50 requested, but cifar10 (split test, classes seen) has 10 images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmtard.data.registry"):
        create_dataset("cifar10", tmp_path / "d", image_size=32, samples=10)
    assert caplog.text == ""


def test_dataset_that_needs_a_folder_given_none():
    with pytest.raises(ConfigError, match="data_dir: dataset cifar10 is read from a data folder .*--data-dir"):
        create_dataset("cifar10", None, image_size=32)
    with pytest.raises(ConfigError, match="--data-dir"):
        check_dataset_source("imagefolder", None)
    assert check_dataset_source("digits", None).name == "digits"


def test_missing_data_is_a_config_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="data_dir: .* does not exist") as raised:
        check_dataset_source("cifar10", tmp_path / "absent")
    assert isinstance(raised.value, ConfigError) and isinstance(raised.value, FileNotFoundError)


def test_corrupt_npz_file(tmp_path):
    _write_npz(tmp_path / "d")
    (tmp_path / "d" / "test.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="test.npz' is not a readable npz file"):
        create_dataset("npz", tmp_path / "d", image_size=32)
    np.savez(tmp_path / "d" / "test.npz", images=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"lacks arrays \['x', 'y'\]"):
        create_dataset("npz", tmp_path / "d", image_size=32)
