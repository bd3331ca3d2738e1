"""Training-step time, FLOPs, MFU and memory of ARD, MMT-ARD and TeCoA at the paper's scale, on one GPU.

ViT-B-32 student (image tower fully fine-tuned), ViT-L-14 clean and robust teachers (random weights:
speed does not depend on them), bf16 autocast, PGD-10 inner maximisation at 4/255, the 1,000 ImageNet
classes (one template: the text prototypes are computed once and are not part of a step). Every step is
the trainer's own ``train_step``.

For each method x batch size x lever (a *cell*):

- FLOPs of one whole step, split into the inner attack, the teachers' forwards and the student update
  (``mmtard.perf.count_step_flops``; counted once per method and batch size, in eager mode);
- ``--warmup`` untimed steps (the first one's time is reported: it includes ``torch.compile``), then
  ``--steps`` timed ones: wall-clock seconds per step (what a run pays), and the same split timed with
  CUDA events;
- MFU = FLOPs per step / seconds per step / the bf16 (or fp32) matrix-product rate measured at the start
  of the same run, per step and per phase;
- peak GPU memory; a batch that does not fit is recorded as ``oom``, not a crash.

Levers (``--levers``, each cell runs with one): ``none``; ``channels-last`` (images and towers in
channels-last memory format); ``compile`` (``torch.compile`` of the student's and teachers' image towers);
``teacher-cache`` (``method.cache_clean_teacher``: the teachers' clean-image logits served from a warm cache, as in
every epoch after the first of a deterministic pipeline, or every step when the cache outlives the run with
``method.cache_dir``); ``one-thread`` (``torch.set_num_threads(1)``: on a CPU, set beside ``none`` to see whether
two students of one thread each beat one student of two).

Results are rewritten after every cell to ``OUT/NAME.json`` and ``OUT/NAME.md`` (a timeout keeps the
cells already done).

    python benchmarks/gpu_step_time.py --out runs/gpu --batch-sizes 128 256 512 --steps 10
    python benchmarks/gpu_step_time.py --out runs/gpu --name levers --methods mmt-ard ard --batch-sizes 256 \\
        --levers none channels-last compile
    python benchmarks/gpu_step_time.py --device cpu --student tiny-vit-s --teacher tiny-vit-l \\
        --batch-sizes 4 --steps 2 --out runs/gpu-toy          # a smoke test on a CPU
    python benchmarks/gpu_step_time.py --device cpu --student tiny-vit-s --teacher tiny-vit-l --num-classes 5 \\
        --batch-sizes 64 --pgd-steps 2 --methods ard mmt-ard --levers none one-thread compile teacher-cache \\
        --steps 5 --warmup 2 --out docs/benchmarks/cpu-levers --name levers   # the zoo protocol's levers on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmtard.data.metadata import imagenet_classnames  # noqa: E402
from mmtard.distributed import BENCHMARK_PRECISIONS  # noqa: E402
from mmtard.fileio import atomic_write_text  # noqa: E402
from mmtard.methods import create_method, freeze, method_config  # noqa: E402
from mmtard.models import ZeroShotClassifier, build_zero_shot_classifier, load_clip  # noqa: E402
from mmtard.models.loading import CLIPBundle  # noqa: E402
from mmtard.perf import (  # noqa: E402
    MATMUL_SIDE,
    PHASES,
    count_step_flops,
    measure_matmul_tflops,
    mfu,
    phase_seconds,
    synchronize,
    timed_phases,
)
from mmtard.train.config import OptimConfig, RunConfig  # noqa: E402
from mmtard.train.trainer import TrainState, build_optimizer, train_step  # noqa: E402

METHODS = ("ard", "mmt-ard", "tecoa")
LEVERS = ("none", "channels-last", "compile", "teacher-cache", "one-thread")
TEACHER_ROLES = ("clean", "robust")
EPS = 4 / 255
GRAD_CLIP = 1.0


@dataclass
class Models:
    """What every cell shares: the student's bundle, the frozen teachers and the label set."""

    student: CLIPBundle
    teachers: dict[str, ZeroShotClassifier]
    classnames: list[str]
    templates: list[str]


@dataclass
class Cell:
    """One method's training step, ready to run: ``run()`` is one ``train_step``."""

    method_name: str
    batch: int
    lever: str
    state: TrainState
    teachers: dict[str, ZeroShotClassifier]
    run: Callable[[], object]


def load_models(student_arch: str, teacher_arch: str, num_classes: int, device: torch.device) -> Models:
    """Random-weight student and teachers with a ``num_classes``-way ImageNet head (first classes)."""
    torch.manual_seed(0)
    classnames, templates = imagenet_classnames()[:num_classes], ["a photo of a {}."]
    student = load_clip(student_arch, "none", device=device)
    student.model.requires_grad_(False)
    student.model.visual.requires_grad_(True)
    teachers = {}
    for role in TEACHER_ROLES:
        bundle = load_clip(teacher_arch, "none", device=device)
        freeze(bundle.model)
        teachers[role] = build_zero_shot_classifier(bundle, classnames, templates)
        freeze(teachers[role])
    return Models(student, teachers, classnames, templates)


def build_cell(
    models: Models,
    method_name: str,
    batch: int,
    lever: str,
    pgd_steps: int,
    total_steps: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> Cell:
    """A fresh student classifier, optimizer and method on random images of ``batch`` (lever not applied)."""
    student = build_zero_shot_classifier(models.student, models.classnames, models.templates).train()
    params = [p for p in student.parameters() if p.requires_grad]
    run_config = RunConfig(train=OptimConfig(steps=total_steps, lr=2e-5, grad_clip=GRAD_CLIP))
    optimizer, scheduler = build_optimizer(run_config, params)
    cached = lever == "teacher-cache" and method_name != "tecoa"  # tecoa has no teacher to cache
    method = create_method(method_config(method_name, eps=EPS, steps=pgd_steps, cache_clean_teacher=cached))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    state = TrainState(0, student, optimizer, scheduler, scaler, method)
    teachers = method.use_teachers(models.teachers).teachers
    size = models.student.image_size
    generator = torch.Generator(device=device).manual_seed(batch)
    x = torch.rand(batch, 3, size, size, device=device, generator=generator)
    y = torch.randint(0, len(models.classnames), (batch,), device=device, generator=generator)
    if lever == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    index = torch.arange(batch) if cached else None  # the same images every step: the cache is warm after one

    def run() -> object:
        return train_step(state, (x, y, index), precision=autocast_dtype, optim=run_config.train)

    return Cell(method_name, batch, lever, state, teachers, run)


def apply_lever(cell: Cell) -> Callable[[], None]:
    """Apply the cell's lever to its student and teachers; returns the function that undoes it on the
    shared teachers and the shared student tower (the cell's own classifier is discarded after it)."""
    models = [cell.state.student, *cell.teachers.values()]
    if cell.lever == "compile":
        towers = [(model, model.visual) for model in models]
        for model, tower in towers:
            model.visual = torch.compile(tower, dynamic=False)  # as train.compile does (mmtard.train.build)

        def undo() -> None:
            for model, tower in towers:
                model.visual = tower

        return undo
    if cell.lever == "channels-last":
        for model in models:
            model.visual.to(memory_format=torch.channels_last)

        def undo() -> None:
            for model in models:
                model.visual.to(memory_format=torch.contiguous_format)

        return undo
    if cell.lever == "one-thread":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return lambda: torch.set_num_threads(threads)
    return lambda: None


def measure_cell(cell: Cell, warmup: int, steps: int, device: torch.device, peak_tflops: float, flops: dict) -> dict:
    """Time ``cell``: ``warmup`` untimed steps, then ``steps`` timed ones (wall clock and per phase)."""
    undo = apply_lever(cell)
    try:
        first_step = None
        for done in range(warmup):
            started = time.perf_counter()
            cell.run()
            synchronize(device)
            if done == 0:
                first_step = time.perf_counter() - started
        timed = []
        started = time.perf_counter()
        for _ in range(steps):
            with timed_phases(cell.state.method, cell.teachers, device) as phases:
                cell.run()
            timed.append(phases)
        synchronize(device)
        seconds = (time.perf_counter() - started) / steps
    finally:
        undo()
    splits = [phase_seconds(phases) for phases in timed]
    phase_mean = {phase: statistics.mean(split[phase] for split in splits) for phase in PHASES}
    peak = peak_tflops * 1e12
    return {
        "first_step_seconds": first_step,
        "seconds_per_step": seconds,
        "samples_per_s": cell.batch / seconds,
        "event_seconds_per_step": statistics.mean(split["total"] for split in splits),
        "phase_seconds": phase_mean,
        "tflops_per_s": flops["total"] / seconds / 1e12,
        "mfu": mfu(flops["total"], seconds, peak),
        "phase_mfu": {
            phase: mfu(flops[phase], phase_mean[phase], peak) if phase_mean[phase] > 0 else None for phase in PHASES
        },
    }


def run_cell(models: Models, method_name: str, batch: int, lever: str, args, device, dtype, peak, flop_cache) -> dict:
    """One row of the results: the cell's measurements, or ``status: oom``."""
    row = {"method": method_name, "batch": batch, "lever": lever, "status": "ok"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        cell = build_cell(
            models, method_name, batch, lever, args.pgd_steps, 1 + args.warmup + args.steps, device, dtype
        )
        key = (method_name, batch, lever == "teacher-cache")  # a warm cache's step skips the teachers' forwards
        if key not in flop_cache:
            if lever == "teacher-cache":
                cell.run()  # fills the cache: the counted step is a warm one
            flop_cache[key] = count_step_flops(cell.run, cell.state.method, cell.teachers)
        flops = flop_cache[key]
        row["flops_per_step"] = flops
        row["gflops_per_image"] = flops["total"] / batch / 1e9
        row.update(measure_cell(cell, args.warmup, args.steps, device, peak, flops))
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # noqa: BLE001 -- only with --keep-going: record a failed lever, run the rest
        if not args.keep_going:
            raise
        traceback.print_exc()
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


TABLE_HEADER = (
    "method", "batch", "lever", "s / step", "samples / s", "attack s", "teachers s", "update s", "TFLOP / step",
    "GFLOP / image", "TFLOP/s", "MFU", "MFU attack / teachers / update", "peak GiB", "first step s",
)  # fmt: skip
TABLE_COLUMNS = len(TABLE_HEADER)


def _cell_text(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict) -> str:
    """The results as a markdown table, with the run's settings above it."""
    lines = [
        f"Device: {summary['device']}; torch {summary['torch']}; {summary['precision']}; student "
        f"{summary['student']}, teachers {summary['teacher']}; PGD-{summary['pgd_steps']} at 4/255; "
        f"{summary['num_classes']} classes; {summary['warmup']} warm-up + {summary['steps']} timed steps per cell.",
        f"Measured {summary['matmul']['dtype']} matrix-product rate: {summary['matmul']['tflops']:.3g} TFLOP/s "
        f"({summary['matmul']['n']}^3). MFU = FLOPs per step / s per step / that rate.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * TABLE_COLUMNS,
    ]
    for row in summary["results"]:
        cells = [row["method"], str(row["batch"]), row["lever"]]
        if row["status"] != "ok":
            status = "OOM" if row["status"] == "oom" else row["status"]
            lines.append("| " + " | ".join(cells + [status] + ["-"] * (TABLE_COLUMNS - 4)) + " |")
            continue
        phases, phase_mfu = row["phase_seconds"], row["phase_mfu"]
        cells += [f"{row['seconds_per_step']:.3f}", f"{row['samples_per_s']:.1f}"]
        cells += [f"{phases[p]:.3f}" for p in PHASES]
        cells += [
            f"{row['flops_per_step']['total'] / 1e12:.2f}",
            f"{row['gflops_per_image']:.1f}",
            f"{row['tflops_per_s']:.3g}",
            f"{100 * row['mfu']:.1f}%",
            " / ".join("-" if phase_mfu[p] is None else f"{100 * phase_mfu[p]:.0f}%" for p in PHASES),
            _cell_text(row.get("peak_memory_gib"), 1),
            _cell_text(row["first_step_seconds"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ratios = summary.get("mmt_ard_over_ard_step_time", {})
    if ratios:
        lines += ["", "MMT-ARD / ARD step time: " + ", ".join(f"{key}: {value:.2f}" for key, value in ratios.items())]
    return "\n".join(lines) + "\n"


def step_time_ratios(results: Sequence[dict]) -> dict[str, float]:
    """``mmt-ard`` over ``ard`` seconds per step for each batch size and lever both finished."""
    seconds = {(r["method"], r["batch"], r["lever"]): r["seconds_per_step"] for r in results if r["status"] == "ok"}
    return {
        f"batch {batch}, {lever}": value / seconds[("ard", batch, lever)]
        for (method, batch, lever), value in seconds.items()
        if method == "mmt-ard" and ("ard", batch, lever) in seconds
    }


def write_results(summary: dict, out: Path, name: str) -> None:
    summary["mmt_ard_over_ard_step_time"] = step_time_ratios(summary["results"])
    atomic_write_text(out / f"{name}.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(summary))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--levers", nargs="+", default=["none"], choices=LEVERS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per cell (after the FLOP count)")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--student", default="ViT-B-32")
    parser.add_argument("--teacher", default="ViT-L-14")
    parser.add_argument("--num-classes", type=int, default=1000, help="the first N ImageNet classes")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test, tiny models)")
    precisions = ["auto", *BENCHMARK_PRECISIONS]
    parser.add_argument("--precision", choices=precisions, default="auto", help="auto: bf16 on a GPU")
    parser.add_argument("--matmul-n", type=int, default=None, help="side of the peak-rate matrices (8192 on a GPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_step_time"))
    parser.add_argument("--name", default="step_time", help="files OUT/NAME.json and OUT/NAME.md")
    parser.add_argument("--keep-going", action="store_true", help="record a cell's error (not only OOM) and go on")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.pgd_steps < 0:
        parser.error("--steps must be >= 1, --warmup and --pgd-steps >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = BENCHMARK_PRECISIONS[precision]
    matmul_dtype = dtype or torch.float32
    matmul_n = args.matmul_n or MATMUL_SIDE.get(device.type, MATMUL_SIDE["cpu"])
    peak_tflops = measure_matmul_tflops(device, matmul_dtype, n=matmul_n)
    models = load_models(args.student, args.teacher, args.num_classes, device)
    summary = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "student": args.student,
        "teacher": args.teacher,
        "precision": f"{precision} autocast" if dtype else "fp32",
        "pgd_steps": args.pgd_steps,
        "num_classes": args.num_classes,
        "warmup": args.warmup,
        "steps": args.steps,
        "matmul": {
            "dtype": str(matmul_dtype).removeprefix("torch."),
            "n": matmul_n,
            "tflops": peak_tflops,
        },
        "results": [],
    }
    flop_cache: dict = {}
    for batch in args.batch_sizes:
        for method_name in args.methods:
            for lever in args.levers:
                row = run_cell(models, method_name, batch, lever, args, device, dtype, peak_tflops, flop_cache)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                summary["results"].append(row)
                write_results(summary, args.out, args.name)
                print(json.dumps(row), flush=True)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
