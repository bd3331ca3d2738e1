"""Dataset registry: each zero-shot dataset's loader, class names and prompt templates.

``create_dataset(name, data_dir, split=..., image_size=..., classes=..., samples=...)`` gives an
``ImageDataset`` of ``[0, 1]`` images whose ``classnames`` and ``templates`` build the zero-shot head.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmtard.data import loaders, metadata
from mmtard.data.loaders import RawImages
from mmtard.errors import ConfigError
from mmtard.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset and name its classes.

    Attributes:
        name: registry name.
        load: ``load(root, split, download) -> RawImages``.
        templates: zero-shot prompt templates (``str.format`` with one ``{}``).
        classnames: the maintained class-name list, or None to take the names the data carries.
        splits: the split names the dataset has; None when any plain name is a split (the ``npz`` format
            reads ``<split>.npz``).
        needs_data_dir: False for data that ships with a package (``digits``).
    """

    name: str
    load: Callable[..., RawImages]
    templates: Callable[[], list[str]]
    classnames: Callable[[], list[str]] | None = None
    splits: tuple[str, ...] | None = ("train", "test")
    needs_data_dir: bool = True


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under ``spec.name``.

    Raises:
        ValueError: the name is already registered to another spec.
    """
    return DATASETS.add(spec.name, spec)


def list_datasets() -> list[str]:
    """Every registered dataset name, sorted."""
    return DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of ``name``.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    return DATASETS.get(name)


@cache
def _imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet WordNet ids in class order, read from clip-benchmark's builder (not imported:
    importing it pulls in optional dependencies)."""
    spec = importlib.util.find_spec("clip_benchmark")
    source = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "builder.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "all_imagenet_wordnet_ids":
            return list(ast.literal_eval(node.value))
    raise ImportError("clip-benchmark's builder.py no longer defines all_imagenet_wordnet_ids")


def _imagenet_family(root, split, download=False) -> RawImages:
    """ImageFolder with WordNet-id folders (ImageNet val, ImageNet-R, ImageNet-Sketch): class names are
    OpenAI's ImageNet names of the folders present."""
    raw = loaders.load_image_folder(root, split)
    index = {wnid: i for i, wnid in enumerate(_imagenet_wnids())}
    names = metadata.imagenet_classnames()
    unknown = [f for f in raw.folder_names if f not in index]
    if unknown:
        raise ConfigError(
            f"data_dir: folders {unknown[:3]} are not ImageNet WordNet ids (expected n0xxxxxxx class folders)"
        )
    raw.classnames = [names[index[f]] for f in raw.folder_names]
    return raw


def _cb(key: str) -> Callable[[], list[str]]:
    return partial(metadata.clip_benchmark_templates, key)


def _cb_names(key: str) -> Callable[[], list[str]]:
    return partial(metadata.clip_benchmark_classnames, key)


for _spec in (
    DatasetSpec("imagenet", _imagenet_family, metadata.imagenet_templates, None, ("train", "val", "test")),
    DatasetSpec("imagenet-r", _imagenet_family, metadata.imagenet_templates, None, ("test",)),
    DatasetSpec("imagenet_sketch", _imagenet_family, metadata.imagenet_templates, None, ("test",)),
    DatasetSpec("cifar10", partial(loaders.load_cifar, num_classes=10), _cb("cifar10")),
    DatasetSpec("cifar100", partial(loaders.load_cifar, num_classes=100), _cb("cifar100")),
    DatasetSpec("stl10", loaders.load_stl10, _cb("stl10")),
    DatasetSpec("cars", loaders.load_image_folder, _cb("cars")),
    DatasetSpec("caltech101", loaders.load_image_folder, _cb("caltech101"), _cb_names("caltech101")),
    DatasetSpec("pets", loaders.load_image_folder, _cb("pets"), _cb_names("pets")),
    DatasetSpec("flowers", loaders.load_image_folder, _cb("flowers"), _cb_names("flowers")),
    DatasetSpec("dtd", loaders.load_image_folder, _cb("dtd")),
    DatasetSpec("eurosat", loaders.load_image_folder, _cb("eurosat"), _cb_names("eurosat")),
    DatasetSpec("fgvc_aircraft", loaders.load_image_folder, _cb("fgvc_aircraft")),
    DatasetSpec("pcam", loaders.load_image_folder, _cb("pcam"), _cb_names("pcam")),
    DatasetSpec("digits", loaders.load_sklearn_digits, _cb("mnist"), _cb_names("mnist"), needs_data_dir=False),
    DatasetSpec("npz", loaders.load_npz_folder, _cb("cifar10"), splits=None),
    DatasetSpec("imagefolder", loaders.load_image_folder, lambda: ["a photo of a {}."]),
):
    register_dataset(_spec)


def resolve_classes(classes: str | Sequence[str] | None, classnames: Sequence[str]) -> list[int]:
    """Class indices for ``all``, ``seen``, ``unseen`` or a list / comma-separated string of names.

    ``seen`` is the first half of the classes in label order (``ceil(K / 2)``) and ``unseen`` the rest:
    for CIFAR-10 exactly the spec's {airplane, automobile, bird, cat, deer} and {dog, frog, horse, ship, truck}.
    """
    k = len(classnames)
    if classes is None or classes == "all":
        return list(range(k))
    if classes == "seen":
        return list(range((k + 1) // 2))
    if classes == "unseen":
        return list(range((k + 1) // 2, k))
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"classes: {twice} named twice; each class is one prototype of the zero-shot head")
    lookup = {name: i for i, name in enumerate(classnames)}
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise ConfigError(
            f"classes: {unknown} are not classes of this dataset; "
            f"expected all, seen, unseen or names from {list(classnames)}"
        )
    return [lookup[n] for n in names]


class ImageDataset(Dataset):
    """Labelled ``[0, 1]`` images of one size; items are ``(image (3, S, S), label, index)``.

    ``classnames`` and ``templates`` define its zero-shot head; labels are ``0..K-1`` in ``classnames``
    order. ``index`` is the item's position in this dataset (used to cache per-sample teacher outputs).
    ``source_indices`` are the items' positions in the whole split as its loader lists it (sorted files of an
    ImageFolder, array order of an npz or torchvision file), before any class or sample selection; with
    ``source_size`` (the split's image count) they pin the subset (see ``create_dataset(indices=...)``).
    """

    def __init__(
        self,
        raw: RawImages,
        classnames: list[str],
        templates: list[str],
        image_size: int,
        name: str,
        source_indices: list[int] | None = None,
        source_size: int | None = None,
    ):
        self.raw = raw
        self.classnames = classnames
        self.templates = templates
        self.image_size = image_size
        self.name = name
        self.source_indices = list(range(len(raw.labels))) if source_indices is None else list(source_indices)
        self.source_size = len(raw.labels) if source_size is None else source_size

    @property
    def labels(self) -> torch.Tensor:
        return self.raw.labels

    def __len__(self) -> int:
        return len(self.raw.labels)

    def __getitem__(self, i: int):
        image = self.raw.images[i]
        if isinstance(image, Path):
            image = loaders.read_image_file(image)
        return loaders.to_model_input(image, self.image_size), int(self.raw.labels[i]), i


def _select(raw: RawImages, keep: torch.Tensor, relabel: dict[int, int] | None = None) -> RawImages:
    images = raw.images[keep] if isinstance(raw.images, torch.Tensor) else [raw.images[i] for i in keep.tolist()]
    labels = raw.labels[keep]
    if relabel is not None:
        labels = torch.tensor([relabel[int(label)] for label in labels], dtype=torch.int64)
    return RawImages(images, labels, raw.classnames, raw.folder_names)


def check_dataset_source(
    name: str, data_dir: str | Path | None, split: str = "test", download: bool = False
) -> DatasetSpec:
    """Check what can be checked without reading the data: the dataset is registered, the split is one of
    its splits, and a dataset read from files has a data folder that exists (or will be downloaded to).

    Returns:
        The dataset's spec.

    Raises:
        ConfigError: unknown dataset or split, or no data folder given for a dataset that needs one.
        DataNotFoundError: the data folder does not exist (a ConfigError and a FileNotFoundError).
    """
    spec = get_dataset_spec(name)
    if spec.splits is None:
        loaders.check_split_name(split)
    elif split not in spec.splits:
        raise ConfigError(f"split: dataset {name} has splits {spec.splits}, got '{split}'")
    if spec.needs_data_dir:
        if data_dir is None or str(data_dir) == "":
            raise ConfigError(
                f"data_dir: dataset {name} is read from a data folder and none was given; pass --data-dir "
                "(data.dir in a run config)"
            )
        if not download:
            loaders.require_dir(data_dir, f"the {name} data folder")
    return spec


def create_dataset(
    name: str,
    data_dir: str | Path | None,
    *,
    split: str = "test",
    image_size: int = 224,
    classes: str | Sequence[str] | None = "all",
    samples: int | None = None,
    classnames: Sequence[str] | None = None,
    download: bool = False,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    source_size: int | None = None,
    part: str | None = None,
) -> ImageDataset:
    """Load a registered dataset as ``[0, 1]`` images of side ``image_size``.

    Args:
        name: a registry name (``list_datasets()``).
        data_dir: its folder (unused for ``digits``).
        split: ``train`` / ``test`` (or the dataset's own split names).
        image_size: the model's input size.
        classes: ``all``, ``seen``, ``unseen`` or class names: keeps those classes, relabelled 0..k-1.
        samples: a fixed class-balanced subset of this many images (after the class selection).
        classnames: names to use instead of the registry's / data's (must have one per label).
        download: allow torchvision to download (never done otherwise).
        seed: seed of the balanced subset choice.
        indices: exactly these images, by their position in the whole split (``ImageDataset.source_indices``
            of an earlier run, e.g. from its ``results.json``); taken before the class selection, and not
            together with ``samples``.
        source_size: with ``indices``, the split's image count they were taken from; another count means
            other data (another copy or version of the dataset), and is refused.
        part: ``"k/n"``: only the k-th of n disjoint, class-balanced parts of the split (:func:`part_positions`),
            taken before the class and sample selection: ``"1/2"`` and ``"2/2"`` split a test set into a
            transfer set to distil on and images to evaluate on. Not together with ``indices``.

    A ``samples`` larger than the images available (after the class selection) takes them all, with a
    warning.

    Raises:
        ConfigError: see :func:`check_dataset_source`; unreadable data; class names that do not match.
    """
    spec = check_dataset_source(name, data_dir, split, download)
    if indices is not None and samples is not None:
        raise ConfigError("samples: give samples or a subset's indices, not both")
    if indices is not None and part is not None:
        raise ConfigError("part: give a part or a subset's indices, not both (the indices fix the images)")
    parsed_part = parse_part(part) if part is not None else None
    raw, positions, total = _load_split(spec, name, data_dir, split, download, indices, source_size, parsed_part)
    names = _class_names(spec, raw, classnames, name, data_dir)
    chosen = resolve_classes(classes, names)
    if chosen != list(range(len(names))):
        raw, positions = _keep_classes(raw, positions, chosen, name, classes, from_subset=indices is not None)
        names = [names[i] for i in chosen]
    if samples is not None:
        raw, positions = _keep_samples(raw, positions, samples, seed, f"{name} (split {split}, classes {classes})")
    return ImageDataset(raw, names, spec.templates(), image_size, name, positions.tolist(), total)


def _load_split(
    spec: DatasetSpec,
    name: str,
    data_dir: str | Path | None,
    split: str,
    download: bool,
    indices: Sequence[int] | None,
    source_size: int | None,
    part: tuple[int, int] | None,
) -> tuple[RawImages, torch.Tensor, int]:
    """The split's images, or only those of ``indices`` or of ``part`` (see :func:`create_dataset`), their
    positions in the split, and the split's size."""
    raw = spec.load(data_dir, split, download=download)
    total = len(raw.labels)
    positions = torch.arange(total)
    if indices is not None:
        positions = _check_indices(indices, total, source_size, name, split)
        raw = _select(raw, positions)
    if part is not None:
        positions = part_positions(raw.labels, *part)
        raw = _select(raw, positions)
    return raw, positions, total


def _class_names(
    spec: DatasetSpec, raw: RawImages, classnames: Sequence[str] | None, name: str, data_dir: str | Path | None
) -> Sequence[str]:
    """The class names: ``classnames`` when given, else the registry's, else the data's; one per label.

    Raises:
        ConfigError: ``classnames: ...``: no names anywhere, or fewer than the labels (for an image folder, not
            one per class folder).
    """
    names = list(classnames) if classnames is not None else (spec.classnames() if spec.classnames else raw.classnames)
    if names is None:
        raise ConfigError(
            f"classnames: dataset {name} has no class names in '{data_dir}' (add classes.txt or pass classnames)"
        )
    num_labels = int(raw.labels.max()) + 1 if len(raw.labels) else 0
    if raw.folder_names is not None:  # an image folder: one label per class folder, and a name for each
        num_labels = len(raw.folder_names)
    # an array's split, or a subset of it, may hold only the first labels of its class list
    if len(names) < num_labels or (raw.folder_names is not None and len(names) != num_labels):
        raise ConfigError(
            f"classnames: {len(names)} class names given for {name}, "
            f"but the labels in '{data_dir}' run 0..{num_labels - 1} "
            f"({num_labels} classes); the list must have one name per label, in label order"
        )
    return names


def _keep_classes(
    raw: RawImages, positions: torch.Tensor, chosen: list[int], name: str, classes: object, from_subset: bool
) -> tuple[RawImages, torch.Tensor]:
    """The images of the ``chosen`` labels, relabelled ``0..k-1`` in that order, and their positions.

    Raises:
        ConfigError: ``from_subset`` (the images were fixed by a subset's indices) and some are of other classes.
    """
    keep = torch.nonzero(torch.isin(raw.labels, torch.tensor(chosen))).flatten()
    if from_subset and len(keep) < len(positions):
        raise ConfigError(
            f"subset: {len(positions) - len(keep)} of its {len(positions)} {name} images are of classes outside "
            f"classes={classes!r}; evaluate a subset with the classes it was made with"
        )
    return _select(raw, keep, {old: new for new, old in enumerate(chosen)}), positions[keep]


def _keep_samples(
    raw: RawImages, positions: torch.Tensor, samples: int, seed: int, described: str
) -> tuple[RawImages, torch.Tensor]:
    """A class-balanced subset of ``samples`` images (all of them, with a warning naming ``described``, when fewer
    are available), and their positions."""
    keep = loaders.balanced_subset(raw.labels, samples, seed)
    raw = _select(raw, keep)
    if len(raw.labels) < samples:
        logger.warning(
            "samples: %d requested, but %s has %d images for a class-balanced subset; using those %d",
            samples,
            described,
            len(raw.labels),
            len(raw.labels),
        )
    return raw, positions[keep]


def parse_part(part: str) -> tuple[int, int]:
    """``"k/n"`` as ``(k, n)``: the k-th of n parts, ``1 <= k <= n``, ``n >= 2``.

    Raises:
        ConfigError: ``part: ...`` naming what was expected.
    """
    k, slash, n = str(part).partition("/")
    if not (slash and k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n) and int(n) >= 2):
        raise ConfigError(f"part: expected k/n with whole numbers 1 <= k <= n and n >= 2 (e.g. 1/2), got '{part}'")
    return int(k), int(n)


def part_positions(labels: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The positions of the k-th of n disjoint parts of a split: within each class, in split order, every n-th
    image starting at the k-th. The parts are class-balanced (class counts differ by at most one between parts),
    cover the split, and depend only on the labels' order, so every run and machine gets the same images."""
    rank = torch.empty_like(labels)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        rank[members] = torch.arange(len(members))
    return torch.nonzero(rank % n == k - 1).flatten()


def _check_indices(indices: Sequence[int], total: int, source_size: int | None, name: str, split: str) -> torch.Tensor:
    """``indices`` as a tensor, if they are distinct whole numbers inside a split of ``total`` images.

    Raises:
        ConfigError: ``subset: ...`` naming the dataset, when they are not, or ``source_size`` differs.
    """
    if source_size is not None and source_size != total:
        raise ConfigError(
            f"subset: the {name} indices were taken from a split of {source_size} images, but {split} here has "
            f"{total}: this is other data (another copy or version of {name})"
        )
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ConfigError(f"subset: the {name} indices must be a non-empty list of whole numbers")
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise ConfigError(f"subset: {name} index {bad[0]} is outside its {split} split of {total} images")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"subset: the {name} indices repeat an image; expected distinct indices")
    return torch.tensor(list(indices), dtype=torch.int64)
