"""Images per second of the ImageFolder JPEG loader, by number of DataLoader workers.

Writes ``--images`` JPEGs (quality 90, smooth random content plus noise, ``--width`` x ``--height`` px) in
ImageFolder layout (``--classes`` class folders) into a temporary folder, then reads them as training
does: ``mmtard.data.create_dataset("imagefolder", ...)`` (decode with PIL, shorter side resized to
``--image-size`` bicubic, centre crop, ``[0, 1]`` floats) through a ``torch.utils.data.DataLoader`` of
``--batch-size``, once per worker count. The main process runs with one torch thread (``--threads``), as
each worker does, so every rate is that of one CPU core.

Per worker count: images/s over the whole pass (worker start-up included) and after the first batch
(the steady rate, the one to size ``data.workers`` with). A GPU that trains at ``S`` steps/s on batch
``B`` needs ``ceil(S * B / rate_per_worker)`` workers.

    python benchmarks/loader_throughput.py --images 512 --workers 0 1 2
    python benchmarks/loader_throughput.py --width 500 --height 375     # about ImageNet's typical size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmtard.data import create_dataset


def write_image_folder(root: Path, images: int, classes: int, width: int, height: int, seed: int = 0) -> float:
    """``images`` JPEGs in ``root/<class>/``; returns their mean file size in KiB."""
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for i in range(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        total_bytes += path.stat().st_size
    return total_bytes / images / 1024


def measure(dataset, workers: int, batch_size: int) -> dict:
    """One pass over ``dataset``: seconds and images/s, overall and after the first batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    started = time.perf_counter()
    first_batch_at, first_batch_images, images = None, 0, 0
    for x, _, _ in loader:
        images += len(x)
        if first_batch_at is None:
            first_batch_at, first_batch_images = time.perf_counter(), len(x)
    seconds = time.perf_counter() - started
    steady_seconds = time.perf_counter() - first_batch_at
    steady_images = images - first_batch_images
    return {
        "workers": workers,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "steady_images_per_s": steady_images / steady_seconds if steady_images else None,
    }


def workers_needed(steps_per_s: float, batch: int, images_per_s_per_worker: float) -> int:
    """Workers that feed ``steps_per_s`` steps of ``batch`` images, each worker at the given rate."""
    return math.ceil(steps_per_s * batch / images_per_s_per_worker)


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| workers | images | seconds | images / s | images / s after the first batch |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        steady = "-" if row["steady_images_per_s"] is None else f"{row['steady_images_per_s']:.0f}"
        lines.append(
            f"| {row['workers']} | {row['images']} | {row['seconds']:.2f} | {row['images_per_s']:.0f} | {steady} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--image-size", type=int, default=224, help="the model's input side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mmtard-loader-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        kib = write_image_folder(root, args.images, args.classes, args.width, args.height)
        print(f"wrote {args.images} JPEGs of {args.width}x{args.height} px ({kib:.1f} KiB each on average) "
              f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
        dataset = create_dataset("imagefolder", root, split="train", image_size=args.image_size)
        rows = [measure(dataset, workers, args.batch_size) for workers in args.workers]
    summary = {
        "images": args.images,
        "source_size": [args.width, args.height],
        "mean_file_kib": kib,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "main_process_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": rows,
    }
    print(table(rows))
    print(f"load average while measuring (1, 5, 15 min): {summary['load_average']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
