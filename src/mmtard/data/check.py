"""``mmtard data check``: is each dataset where it should be, in the layout its loader reads, and how big is it.

:func:`check_dataset` lists the dataset the way evaluation would (file names and labels), decodes its image files
as evaluation would (every one, or with ``quick`` an even spread of :data:`QUICK_IMAGES`), and reports it found or
not, its class and image counts, and, when something is wrong, what (the first files that cannot be decoded) and
the layout expected (:data:`LAYOUTS`, the README's datasets table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mmtard.data.loaders import read_image_file
from mmtard.data.registry import create_dataset, get_dataset_spec
from mmtard.errors import ConfigError

__all__ = [
    "EXPECTED_CLASSES",
    "LAYOUTS",
    "QUICK_IMAGES",
    "DataCheck",
    "check_dataset",
    "default_split",
    "format_checks",
]

#: how many image files ``quick`` decodes, spread evenly over the split
QUICK_IMAGES = 100
#: how many undecodable files a problem names
NAMED_BAD_FILES = 3

_IMAGE_FOLDER = "ImageFolder <split>/<class>/<image> (test/, or val/, or the classes directly in the folder)"
_WNID_FOLDER = "ImageFolder of WordNet-id class folders (n01440764/...), directly or under test/ or val/"
_CIFAR = "torchvision's folder ({}), or an npz folder: test.npz (x uint8 (N, H, W, 3), y int) + classes.txt"

#: the on-disk layout each dataset's loader reads (README, "Datasets")
LAYOUTS = {
    "imagenet": "ImageFolder with WordNet-id class folders: val/n01440764/*.JPEG ... (1,000 folders), train/ alike",
    "imagenet-r": _WNID_FOLDER,
    "imagenet_sketch": _WNID_FOLDER,
    "cifar10": _CIFAR.format("cifar-10-batches-py/"),
    "cifar100": _CIFAR.format("cifar-100-python/"),
    "stl10": "torchvision's folder: stl10_binary/ (test_X.bin, test_y.bin, class_names.txt)",
    "cars": _IMAGE_FOLDER + ", one folder per car model",
    "dtd": _IMAGE_FOLDER + ", one folder per texture",
    "fgvc_aircraft": _IMAGE_FOLDER + ", one folder per aircraft variant",
    "caltech101": _IMAGE_FOLDER + "; labels in sorted folder order, clip-benchmark's class names",
    "pets": _IMAGE_FOLDER + "; labels in sorted folder order, clip-benchmark's class names",
    "flowers": _IMAGE_FOLDER + "; labels in sorted folder order, clip-benchmark's class names",
    "eurosat": _IMAGE_FOLDER + "; labels in sorted folder order, clip-benchmark's class names",
    "pcam": _IMAGE_FOLDER + "; labels in sorted folder order, clip-benchmark's class names",
    "npz": "<split>.npz with x uint8 (N, H, W, 3) and y int, plus classes.txt",
    "imagefolder": _IMAGE_FOLDER,
    "digits": "none: scikit-learn's bundled digits",
}

#: the class count of each full dataset; fewer (a class subset) is usable and noted
EXPECTED_CLASSES = {
    "imagenet": 1000,
    "imagenet-r": 200,
    "imagenet_sketch": 1000,
    "cifar10": 10,
    "cifar100": 100,
    "stl10": 10,
    "cars": 196,
    "caltech101": 102,
    "pets": 37,
    "flowers": 102,
    "dtd": 47,
    "eurosat": 10,
    "fgvc_aircraft": 100,
    "pcam": 2,
}


@dataclass
class DataCheck:
    """What :func:`check_dataset` found.

    Attributes:
        dataset: the registry name.
        data_dir: the folder checked.
        split: the split listed.
        found: the folder exists.
        usable: evaluation can read it.
        classes: number of classes (when usable).
        images: number of images in the split (when usable).
        problem: what is wrong (None when usable).
        note: a remark on a usable dataset (fewer classes than the full dataset, or how many image files were
            decoded when not all were).
        expected: the layout the loader reads.
    """

    dataset: str
    data_dir: str | None
    split: str
    found: bool
    usable: bool
    classes: int | None = None
    images: int | None = None
    problem: str | None = None
    note: str | None = None
    expected: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_split(name: str) -> str:
    """The split evaluation reads by default: ``val`` for ImageNet, ``test`` for the others."""
    return "val" if name == "imagenet" else "test"


def check_dataset(
    name: str, data_dir: str | Path | None, split: str | None = None, *, quick: bool = False, decode: bool = True
) -> DataCheck:
    """List ``name`` in ``data_dir`` as evaluation would, decode its image files, and report what was found.

    Args:
        quick: decode :data:`QUICK_IMAGES` image files spread over the split instead of every one (the note says
            how many).
        decode: False lists the files without decoding any (a suite's check before it runs, which decodes them).

    Raises:
        ConfigError: ``name`` is not a registered dataset (the message lists them).
    """
    spec = get_dataset_spec(name)
    split = default_split(name) if split is None else split
    expected = LAYOUTS.get(name, "see README, Datasets")
    folder = None if data_dir is None else str(data_dir)
    found = not spec.needs_data_dir or (folder is not None and Path(folder).is_dir())
    check = DataCheck(name, folder, split, found, usable=False, expected=expected)
    if not found:
        check.problem = "no data folder given" if folder is None else f"'{folder}' does not exist or is not a folder"
        return check
    try:
        dataset = create_dataset(name, data_dir, split=split, image_size=1)
    except ConfigError as exc:
        check.problem = str(exc).partition(": ")[2] or str(exc)
        return check
    check.usable = True
    check.classes = len(dataset.classnames)
    check.images = len(dataset)
    full = EXPECTED_CLASSES.get(name)
    notes = (
        [f"{check.classes} of the full dataset's {full} classes"] if full is not None and check.classes != full else []
    )
    if check.images == 0:
        check.usable, check.problem = False, "no images in this split"
        return check
    files = [p for p in dataset.raw.images if isinstance(p, Path)] if isinstance(dataset.raw.images, list) else []
    chosen = (_spread(files, QUICK_IMAGES) if quick else files) if decode else []
    if decode and len(chosen) < len(files):
        notes.append(f"{len(chosen)} of {len(files)} image files decoded (--quick)")
    check.note = "; ".join(notes) or None
    bad = _undecodable(chosen)
    if bad:
        shown = "; ".join(bad[:NAMED_BAD_FILES]) + ("; ..." if len(bad) > NAMED_BAD_FILES else "")
        check.usable = False
        check.problem = f"{len(bad)} of the {len(chosen)} image files checked cannot be used: {shown}"
    return check


def _spread(files: list[Path], count: int) -> list[Path]:
    """``count`` of ``files`` at even steps (all when there are fewer)."""
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def _undecodable(files: list[Path]) -> list[str]:
    """What is wrong with each file that evaluation could not decode, in order."""
    problems = []
    for path in files:
        try:
            read_image_file(path)
        except ConfigError as exc:
            problems.append(exc.detail)
    return problems


def format_checks(checks: list[DataCheck]) -> str:
    """One block per dataset: found and usable, class and image counts, or what is wrong and the layout."""
    lines = []
    for c in checks:
        if c.usable:
            note = f" ({c.note})" if c.note else ""
            counts = f"{c.classes} classes, {c.images} images{note}"
            lines.append(f"ok       {c.dataset}: {c.data_dir} [{c.split}]: {counts}")
            continue
        state = "invalid " if c.found else "missing "
        lines.append(f"{state} {c.dataset}: {c.data_dir} [{c.split}]: {c.problem}")
        lines.append(f"         expected: {c.expected}")
    usable = sum(c.usable for c in checks)
    lines.append(f"{usable} of {len(checks)} datasets usable")
    return "\n".join(lines)
