"""Training-step throughput of MMT-ARD against single-teacher ARD at the paper's scale, on one GPU.

ViT-B-32 student, ViT-L-14 clean and robust teachers (random weights: speed does not depend on them),
bf16 autocast, global batch 128, PGD-10 inner maximisation, the 1,000 ImageNet classes (one template:
the text prototypes are computed once and are not part of a step). Each method runs ``--warmup`` untimed
steps, then ``--steps`` timed ones, through the trainer's own ``train_step``; the ratio compares the two in
the same process on the same card.

    python benchmarks/gpu_step_time.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmtard.data.metadata import imagenet_classnames  # noqa: E402
from mmtard.methods import create_method, freeze, method_config  # noqa: E402
from mmtard.models import build_zero_shot_classifier, load_clip  # noqa: E402
from mmtard.train.config import OptimConfig, RunConfig  # noqa: E402
from mmtard.train.trainer import TrainState, build_optimizer, train_step  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(name: str, student_bundle, teachers, args, device, dtype) -> dict:
    classnames, templates = imagenet_classnames(), ["a photo of a {}."]
    student = build_zero_shot_classifier(student_bundle, classnames, templates).train()
    params = [p for p in student.parameters() if p.requires_grad]
    cfg = RunConfig(train=OptimConfig(steps=args.warmup + args.steps, lr=2e-5))
    optimizer, scheduler = build_optimizer(cfg, params)
    method = create_method(method_config(name, eps=4 / 255, steps=10))
    state = TrainState(0, student, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=False), method)
    x = torch.rand(args.batch, 3, student_bundle.image_size, student_bundle.image_size, device=device)
    y = torch.randint(0, len(classnames), (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step(state, teachers, x, y, None, dtype, params, grad_clip=1.0)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(state, teachers, x, y, None, dtype, params, grad_clip=1.0)
    synchronize(device)
    seconds = (time.perf_counter() - started) / args.steps
    return {
        "method": name,
        "seconds_per_step": seconds,
        "samples_per_s": args.batch / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ard", "mmt-ard", "ard", "mmt-ard"],
        help="timed in this order; repeats are averaged (alternating cancels warm-up drift)",
    )
    parser.add_argument("--student", default="ViT-B-32")
    parser.add_argument("--teacher", default="ViT-L-14")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with tiny models)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    student_bundle = load_clip(args.student, "none", device=device)
    student_bundle.model.requires_grad_(False)
    student_bundle.model.visual.requires_grad_(True)
    classnames, templates = imagenet_classnames(), ["a photo of a {}."]
    teachers = {}
    for role in ("clean", "robust"):
        bundle = load_clip(args.teacher, "none", device=device)
        freeze(bundle.model)
        teachers[role] = build_zero_shot_classifier(bundle, classnames, templates)
    results = [time_method(name, student_bundle, teachers, args, device, dtype) for name in args.methods]
    seconds = {
        name: statistics.mean(r["seconds_per_step"] for r in results if r["method"] == name)
        for name in set(args.methods)
    }
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "student": args.student,
        "teacher": args.teacher,
        "precision": "bf16 autocast" if dtype else "fp32",
        "torch": torch.__version__,
        "batch": args.batch,
        "timed_steps": args.steps,
        "results": results,
        "mean_seconds_per_step": seconds,
        "mmt_ard_over_ard_step_time": seconds["mmt-ard"] / seconds["ard"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
