"""Images per second of the evaluation's ``aa`` attack (APGD-CE, then APGD-T on the points still robust,
100 iterations each, 1 restart, L-inf 4/255) for CLIP image towers at their own input size, in bf16
autocast or fp32.

Each cell is ``MODEL:PRECISION:IMAGES[:ATTACK+...]``: a random-weight model with a zero-shot head over
the first ``--num-classes`` ImageNet classes, ``IMAGES`` random images labelled with the model's own
clean predictions (so every image is attacked: the attacks skip misclassified points). Per cell and
attack (the cell's, else ``--attacks``): seconds, images/s, and the fraction still robust after it.
``apgd-ce`` alone is the cost of one 100-iteration APGD run per image; ``aa`` adds APGD-T, which runs up
to ``min(9, K - 1)`` targeted 100-iteration runs on the points APGD-CE did not fool, so on a robust model
``aa`` costs up to ``1 + 9 r`` APGD runs per image, ``r`` the fraction robust after APGD-CE. Random
weights say nothing about ``r`` (a random tower can be nearly constant, hence "robust"): take it from a
real model's evaluation.

Results are rewritten after every cell to ``OUT/NAME.json`` and ``OUT/NAME.md``.

    python benchmarks/aa_throughput.py --out runs/gpu            # ViT-B-32 and ViT-L-14, bf16 and fp32
    python benchmarks/aa_throughput.py --device cpu --cells tiny-vit-s:fp32:4 --steps 2 --out runs/aa-toy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mmtard.attacks import create_attack  # noqa: E402
from mmtard.data.metadata import imagenet_classnames  # noqa: E402
from mmtard.distributed import BENCHMARK_PRECISIONS  # noqa: E402
from mmtard.fileio import atomic_write_text  # noqa: E402
from mmtard.models import build_zero_shot_classifier, load_clip  # noqa: E402
from mmtard.perf import synchronize  # noqa: E402

#: apgd-ce on every model and precision (the cost of one APGD run per image), aa where its up to 10 runs
#: per image stay short.
DEFAULT_CELLS = [
    "ViT-B-32:bf16:256:apgd-ce",
    "ViT-B-32:bf16:64:aa",
    "ViT-B-32:fp32:64:apgd-ce",
    "ViT-L-14:bf16:32:apgd-ce",
    "ViT-L-14:bf16:16:aa",
    "ViT-L-14:fp32:8:apgd-ce",
]
EPS = "4/255"


class Autocast(nn.Module):
    """``model`` run under autocast of ``dtype``, returning fp32 logits (the attack's gradients stay fp32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def parse_cell(text: str) -> tuple[str, str, int, list[str] | None]:
    """``MODEL:PRECISION:IMAGES[:ATTACK+ATTACK...]`` -> ``(model, precision, images, attacks or None)``."""
    parts = text.split(":")
    at = max((i for i, part in enumerate(parts) if part in BENCHMARK_PRECISIONS), default=0)
    rest = parts[at + 1 :]
    if at == 0 or not 1 <= len(rest) <= 2 or not rest[0].isdigit() or int(rest[0]) < 1:
        raise argparse.ArgumentTypeError(f"cell: expected MODEL:{{bf16,fp32}}:IMAGES[:ATTACK+...], got {text!r}")
    attacks = rest[1].split("+") if len(rest) == 2 else None
    return ":".join(parts[:at]), parts[at], int(rest[0]), attacks


def time_attack(model: nn.Module, attack_name: str, x: torch.Tensor, y: torch.Tensor, steps: int | None) -> dict:
    """One run of the attack on ``(x, y)``: seconds, images/s and the fraction still classified as ``y``."""
    attack = create_attack(attack_name, eps=EPS, steps=steps)
    synchronize(x.device)
    started = time.perf_counter()
    x_adv = attack(model, x, y)
    synchronize(x.device)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        robust = (model(x_adv).argmax(dim=1) == y).float().mean().item()
    return {"attack": attack_name, "steps": attack.steps, "seconds": seconds, "images_per_s": len(x) / seconds,
            "robust_fraction": robust}  # fmt: skip


def run_cell(
    model_name: str, precision: str, images: int, attacks: list[str], args, device: torch.device, bundles: dict
) -> dict:
    """Each of ``attacks`` on one model, precision and number of images."""
    if model_name not in bundles:
        torch.manual_seed(0)
        bundles[model_name] = load_clip(model_name, "none", device=device)
    bundle = bundles[model_name]
    bundle.model.requires_grad_(False)
    classifier = build_zero_shot_classifier(bundle, imagenet_classnames()[: args.num_classes], ["a photo of a {}."])
    dtype = BENCHMARK_PRECISIONS[precision]
    model = classifier.eval() if dtype is None else Autocast(classifier, dtype).eval()
    row = {"model": model_name, "precision": precision, "image_size": bundle.image_size, "images": images,
           "status": "ok", "attacks": []}  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(images, 3, bundle.image_size, bundle.image_size, device=device, generator=generator)
        with torch.no_grad():
            y = model(x).argmax(dim=1)
        create_attack("apgd-ce", eps=EPS, steps=2)(model, x[:2], y[:2])  # warm-up: kernels, allocator
        for attack_name in attacks:
            row["attacks"].append(time_attack(model, attack_name, x, y, args.steps))
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def markdown(summary: dict) -> str:
    lines = [
        f"Device: {summary['device']}; torch {summary['torch']}; L-inf {EPS}; random weights, "
        f"{summary['num_classes']}-class zero-shot head; labels = the model's clean predictions "
        "(every image is attacked).",
        "",
        "| model | px | precision | images | attack | iterations | seconds | images / s | robust after | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["results"]:
        head = f"| {row['model']} | {row['image_size']} | {row['precision']} | {row['images']} |"
        peak = row.get("peak_memory_gib")
        peak_text = "-" if peak is None else f"{peak:.1f}"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status'].upper()} | - | - | - | - | {peak_text} |")
        for attack in row["attacks"]:
            lines.append(
                f"{head} {attack['attack']} | {attack['steps']} | {attack['seconds']:.2f} | "
                f"{attack['images_per_s']:.2f} | {100 * attack['robust_fraction']:.0f}% | {peak_text} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=[parse_cell(c) for c in DEFAULT_CELLS])
    parser.add_argument("--attacks", nargs="+", default=["aa", "apgd-ce"], help="for cells that name none")
    parser.add_argument("--steps", type=int, default=None, help="iterations per APGD run (default: 100)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("runs/aa_throughput"))
    parser.add_argument("--name", default="aa")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "num_classes": args.num_classes,
        "eps": EPS,
        "results": [],
    }
    bundles: dict = {}
    for model_name, precision, images, attacks in args.cells:
        row = run_cell(model_name, precision, images, attacks or args.attacks, args, device, bundles)
        summary["results"].append(row)
        atomic_write_text(args.out / f"{args.name}.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(args.out / f"{args.name}.md", markdown(summary))
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
