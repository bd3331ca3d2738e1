"""``mmtard train`` and ``mmtard demo``: flags, checks and the run."""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmtard.cli.common import (
    EVAL_DATA_FLAGS,
    USER_ERRORS,
    whole_number,
)
from mmtard.distributed import check_device
from mmtard.errors import ConfigError

logger = logging.getLogger("mmtard")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a student (MMT-ARD, a baseline) or a teacher from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/cpu/mmt-ard.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=20 --set method.eps=2/255 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'latest' or a checkpoint folder to continue from; the run's saved config.yaml is used, and --set "
        "may only change what a resume allows (more train.steps, data.dir, logging...)",
    )
    p.add_argument(
        "--stop-after",
        type=whole_number(1),
        default=None,
        help="stop with a checkpoint after N >= 1 steps of this invocation",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="the student's and teachers' .pt files may be full pickles, which can run code when loaded: only for "
        "files you made yourself. Only this flag grants it (a run config cannot); give it again with --resume",
    )
    p.add_argument("--no-progress", action="store_true")


def train_config(args: argparse.Namespace):
    """The run config: ``--config`` with ``--set``; to resume, the run's saved ``config.yaml`` with ``--set``
    (the file given with ``--config`` then only locates the run folder). ``--trust-checkpoint`` applies to
    either (``config.yaml`` never holds it)."""
    from mmtard.train.config_io import with_trusted_checkpoints

    config = resolved_train_config(args)
    return with_trusted_checkpoints(config) if args.trust_checkpoint else config


def resolved_train_config(args: argparse.Namespace):
    from mmtard.train.config_io import load_config
    from mmtard.train.resume import config_to_resume
    from mmtard.train.rundir import RunDir

    config = load_config(args.config, args.overrides)
    run = RunDir(config.output_dir)
    if not args.resume or not run.config.is_file():
        return config
    resumed, ignored = config_to_resume(config, run.config, args.overrides)
    if ignored:
        logger.warning(
            "resuming %s with its saved config.yaml; %s differs in %s (not used)",
            run.path,
            args.config,
            ", ".join(ignored),
        )
    return resumed


def run_train(args: argparse.Namespace) -> int:
    from mmtard.train.rundir import RunDir
    from mmtard.train.trainer import train

    config = train_config(args)
    final = train(config, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    if final:
        robust = ", ".join(f"{e['attack']} {e['eps']} ({e['steps']} steps) {e['acc']:.1f}%" for e in final["robust"])
        print(
            f"{config.method.name}: held-out clean {final['clean_acc']:.1f}%, "
            f"robust {robust} on {final['samples']} images"
        )
        model_file = RunDir(config.output_dir).model
        print(f"student weights: {model_file} (mmtard eval --model {config.student.arch} --pretrained {model_file})")
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the CPU-scale protocol in minutes: foundations, teachers, TeCoA / ARD / MMT-ARD students, report"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (report.md, plots, every stage's run)")
    p.add_argument("--dataset", default="digits", help="digits (ships with scikit-learn, default) or cifar10")
    p.add_argument("--data-dir", default=None, help="data folder, e.g. ../shared/data/cifar10 for --dataset cifar10")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--download", action="store_true", help=argparse.SUPPRESS)  # refused with its reason


#: the demo's names of the run config's fields (errors of its training stages name the demo's flags)
DEMO_FLAGS = {
    **EVAL_DATA_FLAGS,
    "data.dir": "--data-dir",
    "data.dataset": "--dataset",
    "device": "--device",
    "output_dir": "--out",
}


def check_demo_args(args: argparse.Namespace) -> None:
    """The device, the output folder and the data (both splits are read), before the first stage starts."""
    from mmtard.data import create_dataset
    from mmtard.errors import import_optional
    from mmtard.preflight import check_data, check_output_dir, renamed_fields

    if args.download:
        raise ConfigError(
            "--download: the demo never downloads; digits ship with scikit-learn, and --dataset cifar10 reads "
            "--data-dir (torchvision's CIFAR-10 folder or an npz folder; mmtard eval --download fetches it)"
        )
    check_device(args.device, "--device")
    check_output_dir(args.out, "--out")
    check_data(args.dataset, args.data_dir, "test", EVAL_DATA_FLAGS)
    import_optional("matplotlib", "plots", "the demo's plots")  # needed at the end: say so before training
    with renamed_fields(EVAL_DATA_FLAGS):
        for split in ("train", "test"):
            create_dataset(args.dataset, args.data_dir, split=split)  # labels, class names, readable files


@contextmanager
def without_partial_stages(out: Path) -> Iterator[None]:
    """On a user error (a disk full included), remove what this command created and did not finish: the stage
    folders without their final model, evaluation journals, and ``out`` itself when it was new and holds
    nothing finished. Finished stages stay (a rerun reuses them); Ctrl-C keeps everything, to continue from."""
    existed = out.exists()
    before = set(out.glob("*")) | set(out.glob("*/eval_journal"))
    try:
        yield
    except USER_ERRORS:
        from mmtard.train.rundir import RunDir

        created = [p for p in out.glob("*") if p not in before]
        for stage in created:
            if stage.is_dir() and not RunDir(stage).model.is_file():
                shutil.rmtree(stage, ignore_errors=True)
        for journal in out.glob("*/eval_journal"):
            if journal not in before:
                shutil.rmtree(journal, ignore_errors=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def run_demo(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from mmtard.experiments import DEMO_SCALE, run_protocol, write_protocol_report
    from mmtard.experiments.report import results_table
    from mmtard.fileio import reported_write_errors
    from mmtard.preflight import renamed_fields

    check_demo_args(args)
    scale = replace(DEMO_SCALE, dataset=args.dataset, data_dir=args.data_dir, device=args.device)
    if args.dataset != "digits":
        scale = replace(scale, train_samples=5000)
    started = time.perf_counter()
    out = Path(args.out)
    with without_partial_stages(out), reported_write_errors("--out", out), renamed_fields(DEMO_FLAGS):
        rows = run_protocol(out, scale, progress=not args.no_progress)
        scale_text = (
            f"foundations {scale.foundation_steps} steps, teachers {scale.teacher_steps}, students "
            f"{scale.student_steps} (batch {scale.batch_size}, training PGD-{scale.train_attack_steps} at eps 4/255); "
            f"{scale.eval_samples} test images per column; whole run {time.perf_counter() - started:.0f} s"
        )
        command = "mmtard demo " + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (("out", args.out), ("dataset", args.dataset), ("data_dir", args.data_dir))
            if v
        )
        report = write_protocol_report(args.out, rows, command, scale_text)
    print("seen classes (in-distribution)\n" + results_table(rows, "seen"))
    print("\nunseen classes (zero-shot)\n" + results_table(rows, "unseen"))
    print(f"\n{scale_text}\nwrote {report} and its plots")
    return 0
