"""Image sources in their on-disk formats, all returning ``[0, 1]`` float images of one size.

Formats: the npz folder (``<split>.npz`` with ``x`` uint8 ``(N, H, W, 3)``, ``y`` int, and ``classes.txt``;
any split name, so ``gaussian_noise.npz`` of a CIFAR-10-C style folder is ``split="gaussian_noise"``),
torchvision's CIFAR-10/100 and STL-10 folders, the ImageFolder layout
(``root/<split>/<class>/*.jpg``) and scikit-learn's bundled digits. Nothing is downloaded unless
``download=True``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mmtard.errors import ConfigError, import_optional
from mmtard.fileio import require_regular_file


@dataclass
class RawImages:
    """What a loader returns before resizing: images, labels and the class names of the labels.

    ``images`` is either a uint8 tensor ``(N, H, W, 3)`` held in memory, or a list of file paths read
    lazily. ``classnames`` may be None when the registry supplies them (e.g. clip-benchmark's lists).
    """

    images: torch.Tensor | list[Path]
    labels: torch.Tensor
    classnames: list[str] | None
    folder_names: list[str] | None = None


class DataNotFoundError(ConfigError, FileNotFoundError):
    """A data folder or file that does not exist, or holds none of the expected files."""


#: a split name is a file or folder name inside the data folder, never a path
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"data_dir: '{root}' does not exist or is not a folder (expected {what})")
    return root


def check_split_name(split: str) -> str:
    """``split`` itself if it is a plain name (``test``, ``gaussian_noise``), not a path.

    Raises:
        ConfigError: empty, or with a path separator or a leading dot.
    """
    if not SPLIT_NAME.fullmatch(split):
        raise ConfigError(f"split: expected a plain name such as test or gaussian_noise, got {split!r}")
    return split


def load_npz_folder(root: str | Path, split: str, download: bool = False) -> RawImages:
    """The npz folder format: ``<root>/<split>.npz`` with arrays ``x``, ``y`` and ``<root>/classes.txt``.

    Any split name is a file name: ``split="gaussian_noise"`` reads ``gaussian_noise.npz``.
    """
    root = require_dir(root, "a folder with <split>.npz files (test.npz, train.npz, ...) and classes.txt")
    path = root / f"{check_split_name(split)}.npz"
    if not path.exists():
        found = ", ".join(sorted(p.name for p in root.glob("*.npz"))) or "none"
        raise DataNotFoundError(f"data_dir: no '{split}.npz' in '{root}' (npz files found: {found})")
    require_regular_file(path, "data_dir", "an npz file with arrays x and y")
    images, labels = _read_npz_arrays(path)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(
            f"data_dir: '{path}' array x has shape {images.shape} and dtype {images.dtype}; expected uint8 (N, H, W, 3)"
        )
    if 0 in images.shape[1:3]:
        raise ConfigError(f"data_dir: '{path}' holds images of {images.shape[1]}x{images.shape[2]} pixels (empty)")
    if len(images) != len(labels):
        raise ConfigError(f"data_dir: '{path}' has {len(images)} images but {len(labels)} labels")
    labels = check_labels(labels, path)
    classes_file = root / "classes.txt"
    classnames = read_classnames(classes_file) if classes_file.exists() else None
    return RawImages(torch.from_numpy(images), torch.from_numpy(labels), classnames)


def check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """``labels`` as int64 when they are whole numbers ``>= 0`` in a 1-D integer array.

    Raises:
        ConfigError: naming ``path``: string, float or boolean labels, another shape, or a negative label.
    """
    if labels.dtype.kind not in "iu":
        kind = {"U": "string", "S": "string", "f": "float", "c": "complex", "b": "boolean"}.get(labels.dtype.kind)
        raise ConfigError(
            f"data_dir: '{path}' array y holds {kind or labels.dtype.name} labels (dtype {labels.dtype}); "
            "expected whole-number class indices 0..K-1 (an integer dtype)"
        )
    if labels.ndim != 1:
        raise ConfigError(f"data_dir: '{path}' array y has shape {labels.shape}; expected one label per image (N,)")
    negative = np.flatnonzero(labels < 0)
    if len(negative):
        raise ConfigError(
            f"data_dir: '{path}' array y holds {len(negative)} negative label(s) (first: {labels[negative[0]]} at "
            f"index {negative[0]}); expected class indices 0..K-1"
        )
    return labels.astype(np.int64)


def read_classnames(path: Path) -> list[str]:
    """The class names of a ``classes.txt``: one per non-empty line, UTF-8, each name once.

    Raises:
        ConfigError: naming ``path``: not a regular file, not UTF-8, or a name given twice.
    """
    require_regular_file(path, "data_dir", "classes.txt, one class name per line")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"data_dir: '{path}' is not UTF-8 text (byte {exc.start}, line {line}); save the class names as UTF-8"
        ) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise ConfigError(
                f"data_dir: '{path}' names class '{name}' twice (names {seen[name]} and {number}); "
                "each class needs its own name"
            )
        seen[name] = number
    return names


def machine_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_declared_sizes(path: Path, names: tuple[str, ...]) -> None:
    """Read the ``.npy`` headers of ``names`` inside the npz (nothing else) and refuse arrays that declare more
    bytes than the machine's memory, or than the file holds: loading them would exhaust memory or fail late.

    Raises:
        ConfigError: naming ``path``, the arrays and the sizes.
        zipfile.BadZipFile, ValueError, OSError, EOFError: not a readable npz (reported by the caller).
    """
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    declared = {}
    with zipfile.ZipFile(path) as archive:
        for name in names:
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                continue  # reported by the caller
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in headers:
                    continue  # a header version this check does not read; np.load checks it
                shape, _, dtype = headers[version](f)
                declared[name] = (shape, dtype, math.prod(shape) * dtype.itemsize, info.file_size)
    memory = machine_memory_bytes()
    total = sum(nbytes for _, _, nbytes, _ in declared.values())
    if memory is not None and total > memory:
        arrays = ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype, _, _) in declared.items())
        raise ConfigError(
            f"data_dir: '{path}' declares {_size(total)} of arrays ({arrays}), more than this machine's memory "
            f"({_size(memory)}); split it into smaller files"
        )
    for name, (shape, dtype, nbytes, held) in declared.items():
        if nbytes > held:
            raise ConfigError(
                f"data_dir: '{path}' array {name} declares {shape} {dtype} ({_size(nbytes)}), but the file holds "
                f"{_size(held)} for it (truncated or corrupt)"
            )


def _size(nbytes: int) -> str:
    for unit, scale in (("EiB", 2**60), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _read_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an npz file; a corrupt file, a missing array, or arrays that declare more than
    the machine's memory are one ConfigError (the sizes are read from the headers, before any array)."""
    try:
        _check_declared_sizes(path, ("x", "y"))
        with np.load(path, allow_pickle=False) as arrays:
            found = {name: arrays[name] for name in ("x", "y") if name in arrays.files}
    except ConfigError:
        raise  # the sizes its headers declare (a ConfigError is a ValueError too: keep its own message)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"data_dir: '{path}' is not a readable npz file ({type(exc).__name__}: {exc})") from None
    missing = {"x", "y"} - set(found)
    if missing:
        raise ConfigError(
            f"data_dir: '{path}' lacks arrays {sorted(missing)}; expected x uint8 (N, H, W, 3) and y int (N,)"
        )
    return found["x"], found["y"]


def _from_torchvision(dataset_cls: Callable, root: Path, download: bool, **kwargs) -> RawImages:
    try:
        ds = dataset_cls(root=str(root), download=download, **kwargs)
    except RuntimeError as exc:
        reason = str(exc).split(". You can use download=True")[0]  # torchvision's advice names its own argument
        raise DataNotFoundError(
            f"data_dir: torchvision's {dataset_cls.__name__} files are not in '{root}' ({reason}); expected its "
            "folder or an npz folder (mmtard eval --download fetches torchvision's copy)"
        ) from None
    data = np.asarray(ds.data)
    if data.shape[1] == 3:  # STL-10 stores (N, 3, H, W)
        data = data.transpose(0, 2, 3, 1)
    labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels)
    classnames = [c.replace("_", " ") for c in ds.classes]
    return RawImages(
        torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels.astype(np.int64)), classnames
    )


def load_cifar(root: str | Path, split: str, download: bool = False, num_classes: int = 10) -> RawImages:
    """torchvision's CIFAR folder (``cifar-10-batches-py`` / ``cifar-100-python``), or the npz folder format."""
    from torchvision.datasets import CIFAR10, CIFAR100

    root = Path(root)
    if (root / f"{split}.npz").is_file():
        return load_npz_folder(root, split)
    if not download:
        require_dir(root, f"torchvision's CIFAR-{num_classes} folder or an npz folder")
    return _from_torchvision(CIFAR10 if num_classes == 10 else CIFAR100, root, download, train=(split == "train"))


def load_stl10(root: str | Path, split: str, download: bool = False) -> RawImages:
    from torchvision.datasets import STL10

    if not download:
        require_dir(root, "torchvision's STL-10 folder (stl10_binary)")
    return _from_torchvision(STL10, Path(root), download, split=split)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpeg", ".ppm")


def load_image_folder(root: str | Path, split: str, download: bool = False) -> RawImages:
    """``root/<split>/<class>/<image>`` (or ``root/<class>/<image>`` when there is no split folder).

    ImageNet's ``val`` split is accepted for ``test``. Labels follow the sorted folder names.
    """
    root = require_dir(root, "an ImageFolder layout root/<split>/<class>/<image>")
    candidates = [root / split] + ([root / "val"] if split == "test" else []) + [root]
    base = next(p for p in candidates if p.is_dir())
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if not folders:
        raise DataNotFoundError(f"data_dir: no class folders under '{base}' (expected <class>/<image> files)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataNotFoundError(f"data_dir: no image files under '{base}'")
    names = [f.name for f in folders]
    return RawImages(
        paths, torch.tensor(labels, dtype=torch.int64), [n.replace("_", " ") for n in names], folder_names=names
    )


def load_sklearn_digits(root: str | Path | None = None, split: str = "test", download: bool = False) -> RawImages:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images), as RGB uint8.

    A fixed split: every fifth image (index % 5 == 0) is ``test``, the rest ``train``.

    Raises:
        MissingExtraError: scikit-learn is not installed (it comes with ``mmtard[demo]``).
    """
    sklearn_datasets = import_optional("sklearn.datasets", "demo", "the digits dataset")
    digits = sklearn_datasets.load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    keep = (np.arange(len(images)) % 5 == 0) if split == "test" else (np.arange(len(images)) % 5 != 0)
    return RawImages(torch.from_numpy(images[keep]), torch.from_numpy(digits.target[keep].astype(np.int64)), None)


def read_image_file(path: Path) -> torch.Tensor:
    """One image file as a uint8 ``(H, W, 3)`` tensor.

    Raises:
        ConfigError: naming the file: not a regular file (a FIFO would hang), not decodable (0x0 pixels
            included), or more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    require_regular_file(path, "data_dir", "an image file")
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refuse both alike
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # PIL refuses a 0x0 image as unidentifiable
                return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ConfigError(
            f"data_dir: image file '{path}' is too large to decode safely ({str(exc).rstrip('.')}); downscale it"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(
            f"data_dir: image file '{path}' cannot be decoded ({exc.__class__.__name__}: {exc})"
        ) from None


def to_model_input(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(3, S, S)`` in ``[0, 1]``: shorter side resized to S (bicubic, as
    CLIP's preprocessing) and centre-cropped. Images already S x S are only converted."""
    x = image.permute(2, 0, 1).float().div_(255)
    h, w = x.shape[-2:]
    if (h, w) == (image_size, image_size):
        return x
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=scale < 1)[0].clamp_(0, 1)
    top, left = (x.shape[-2] - image_size) // 2, (x.shape[-1] - image_size) // 2
    return x[:, top : top + image_size, left : left + image_size]


def balanced_subset(labels: Sequence[int] | torch.Tensor, samples: int, seed: int = 0) -> torch.Tensor:
    """A fixed, class-balanced choice of ``samples`` indices (sorted).

    Each class gets ``samples // K`` images, the first ``samples % K`` classes one more; within a class
    the images are a seeded random choice, so the subset is the same for every model and run.
    """
    labels = torch.as_tensor(labels)
    classes = torch.unique(labels).tolist()
    if samples <= 0:
        raise ConfigError(f"samples: expected a positive number, got {samples}")
    if samples >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(samples, len(classes))
    chosen = []
    for position, cls in enumerate(classes):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: per_class + (1 if position < extra else 0)])
    return torch.sort(torch.cat(chosen)).values
