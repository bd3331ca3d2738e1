"""What a GPU machine without internet needs for the zoo benchmark, in under 64 MiB, and its unpacking there.

A lent GPU machine gets a copy of the repository (64 MiB at most with what is carried), PyTorch and no
internet. ``pack`` (here, where the packages are installed and ``../shared`` is beside the checkout) writes a
git-ignored folder with:

- ``site/``: open_clip, ftfy, wcwidth and pyautoattack as installed here (pure Python), and clip-benchmark's
  package marker with its English class-name and template files (all mmtard reads of it);
- ``zoo/``: ``../shared/zoo`` as it is (fp16 weights and ``rebuild.py``, about 37 MB);
- ``repo.tar.gz`` and ``COMMIT``: the committed tree of ``--commit`` (HEAD), which the run uses instead of the
  working tree that travels with it (work in progress there cannot change what is measured);
- ``cifar10/``: ``classes.txt`` and ``train.npz`` / ``test.npz`` with each image as JPEG bytes (train quality
  85, test quality 90; every image). The JPEG header, the same for every 32 px image of one quality, is stored
  once, which halves the size.

``unpack`` (there) decodes the images back into the ``x``/``y`` npz files of ``../shared/data/cifar10``. Pixels
differ from the originals by the JPEG round trip (mean absolute error about 1 to 2 of 255), so numbers from a
GPU run are compared with each other, not with a CPU run's.

    python benchmarks/gpu_bundle.py pack --out .gpu          # here, once (.gpu/ is git-ignored)
    python benchmarks/gpu_bundle.py unpack --bundle .gpu --data /tmp/cifar10   # there, by gpu_run.sh
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np

PURE_PACKAGES = ("open_clip", "ftfy", "wcwidth", "pyautoattack")
CLIP_BENCHMARK_FILES = ("en_classnames.json", "en_zeroshot_classification_templates.json")
SKIPPED = shutil.ignore_patterns("__pycache__", "examples", "*.pyc")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name}: not installed here; pip install '.[all]' first")
    return Path(next(iter(spec.submodule_search_locations)))


def pack_site(out: Path) -> None:
    for name in PURE_PACKAGES:
        shutil.copytree(package_dir(name), out / name, ignore=SKIPPED, dirs_exist_ok=True)
    source = package_dir("clip_benchmark")
    (out / "clip_benchmark" / "datasets").mkdir(parents=True, exist_ok=True)
    (out / "clip_benchmark" / "__init__.py").write_text("")
    for name in CLIP_BENCHMARK_FILES:
        shutil.copy2(source / "datasets" / name, out / "clip_benchmark" / "datasets" / name)


def encode_jpeg(images: np.ndarray, quality: int) -> dict[str, np.ndarray]:
    """``images`` (N, H, W, 3) uint8 as one shared JPEG header and each image's remaining bytes."""
    from PIL import Image

    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        blobs.append(buffer.getvalue())
    scan = blobs[0].index(b"\xff\xda")  # start of scan: everything before its end is the shared header
    cut = scan + 2 + int.from_bytes(blobs[0][scan + 2 : scan + 4], "big")
    header = blobs[0][:cut]
    if any(blob[:cut] != header for blob in blobs):
        raise SystemExit("JPEG headers differ between images; store them whole instead")
    return {
        "jpeg_header": np.frombuffer(header, np.uint8),
        "jpeg_body": np.concatenate([np.frombuffer(blob[cut:], np.uint8) for blob in blobs]),
        "jpeg_lengths": np.array([len(blob) - cut for blob in blobs]),
    }


def decode_jpeg(packed) -> np.ndarray:
    from PIL import Image

    header = packed["jpeg_header"].tobytes()
    body = packed["jpeg_body"]
    ends = np.cumsum(packed["jpeg_lengths"])
    starts = ends - packed["jpeg_lengths"]
    images = [
        np.asarray(Image.open(io.BytesIO(header + body[s:e].tobytes())).convert("RGB")) for s, e in zip(starts, ends)
    ]
    return np.stack(images)


def pack_cifar10(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "classes.txt", out / "classes.txt")
    for split, quality in (("train", 85), ("test", 90)):
        data = np.load(source / f"{split}.npz")
        arrays = {key: data[key] for key in data.files if key != "x"}
        np.savez(out / f"{split}.npz", **encode_jpeg(data["x"], quality), **arrays)


def unpack_cifar10(bundle: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bundle / "classes.txt", out / "classes.txt")
    for split in ("train", "test"):
        packed = np.load(bundle / f"{split}.npz")
        arrays = {key: packed[key] for key in packed.files if not key.startswith("jpeg_")}
        np.savez(out / f"{split}.npz", x=decode_jpeg(packed), **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    pack = verbs.add_parser("pack")
    pack.add_argument("--out", default=".gpu")
    pack.add_argument("--shared", default="../shared")
    pack.add_argument("--commit", default="HEAD", help="the commit whose tree the GPU run uses")
    unpack = verbs.add_parser("unpack")
    unpack.add_argument("--bundle", default=".gpu")
    unpack.add_argument("--data", required=True)
    args = parser.parse_args()
    if args.verb == "pack":
        out, shared = Path(args.out), Path(args.shared)
        pack_site(out / "site")
        shutil.copytree(shared / "zoo", out / "zoo", dirs_exist_ok=True)
        pack_cifar10(shared / "data" / "cifar10", out / "cifar10")
        commit = subprocess.run(["git", "rev-parse", args.commit], capture_output=True, text=True, check=True).stdout
        subprocess.run(
            ["git", "archive", "--format=tar.gz", "-o", str(out / "repo.tar.gz"), commit.strip()], check=True
        )
        (out / "COMMIT").write_text(commit)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{out}: {size / 2**20:.1f} MiB")
    else:
        unpack_cifar10(Path(args.bundle) / "cifar10", Path(args.data))
        print(f"{args.data}: train.npz, test.npz, classes.txt")


if __name__ == "__main__":
    main()
