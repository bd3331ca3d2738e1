"""``mmtard eval | train | demo | export | data check``: argument parsing only; the work is in the library.

Every error the user can cause (a flag, a config field, a file, the machine) is one line on stderr,
``mmtard <command>: error: <field>: <what is wrong and what is expected>``, with exit code 2; a refused
command leaves the file system as it found it. ``--debug`` shows the traceback instead. SIGTERM or SIGINT
during ``mmtard train`` save a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmtard.errors import ConfigError, NonFiniteError, TrainingInterrupted, WorkerTimeoutError

logger = logging.getLogger("mmtard")

#: Errors a user causes (input, files, the machine, a diverging run): one line and exit code 2.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, NonFiniteError)
EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``mmtard <command>: error: <flag>: <message>`` (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument "):  # "argument --batch-size: invalid int value: 'x'"
            message = message[len("argument ") :]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


#: the largest seed: torch's generators take 64-bit seeds, and seeds are offset per process, epoch and step
MAX_SEED = 2**63 - 1


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low`` (and ``<= high`` when given)."""
    expected = f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def logit_scale_arg(text: str) -> float | str:
    """``model`` or a positive number."""
    if text == "model":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number (100) or 'model', got {text!r}")
    from mmtard.models.zeroshot import check_logit_scale

    try:
        return check_logit_scale(value, "")
    except ConfigError as exc:  # beyond float32's range
        raise argparse.ArgumentTypeError(str(exc).removeprefix(": ")) from None


@contextmanager
def leave_as_found(folder: Path, inside: Sequence[str] = ()) -> Iterator[None]:
    """On a user error, remove ``folder`` if this command created it, else the entries ``inside`` it that
    this command created; an interrupted command (Ctrl-C) keeps them, to continue from."""
    existed = folder.exists()
    existing = {name for name in inside if (folder / name).exists()}
    try:
        yield
    except USER_ERRORS:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for name in set(inside) - existing:
                shutil.rmtree(folder / name, ignore_errors=True)
        raise


def fraction_arg(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_vision_weights_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vision-weights",
        default=None,
        metavar="FILE",
        help="an image-tower state dict (RobustVLM FARE/TeCoA .pt, TeCoA vision_encoder_state_dict, .safetensors) "
        "loaded into the model's image tower over --pretrained",
    )
    p.add_argument(
        "--vision-weights-alpha",
        type=fraction_arg,
        default=1.0,
        metavar="A",
        help="weight-space interpolation: A * file + (1 - A) * base tower (default 1: the file's tower)",
    )


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clean and robust zero-shot accuracy of a CLIP model")
    p.add_argument(
        "--model", required=True, help="open_clip architecture (ViT-B-32, tiny-vit-s, ...) or hf-hub:ORG/REPO"
    )
    p.add_argument(
        "--pretrained", default="none", help="pretrained tag (openai, ...), checkpoint file, or none (random weights)"
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full unpickling of a .pt checkpoint (runs code: only for your own files)",
    )
    _add_vision_weights_flags(p)
    p.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="one or more registered datasets (see README); with --suite, a part of the suite's",
    )
    p.add_argument(
        "--data-dir",
        nargs="+",
        default=[None],
        help="data folder per dataset (one for all, or one each); with --suite, the root holding ROOT/<dataset>",
    )
    p.add_argument(
        "--suite",
        default=None,
        help="a protocol as data: robustvlm (ImageNet 5k + 13 zero-shot sets x 1k, aa at 1, 2, 4/255) or a suite "
        "YAML file; it sets the datasets, splits, samples, attacks, radii and norm",
    )
    p.add_argument(
        "--subset",
        default=None,
        metavar="FILE",
        help="evaluate exactly the images of an earlier run: its subset.json or results.json",
    )
    p.add_argument("--split", default=None, help="the split to read (default: test)")
    p.add_argument("--classes", default="all", help="all | seen | unseen | comma-separated class names")
    p.add_argument("--samples", type=whole_number(1), default=None, help="fixed class-balanced subset of N images")
    p.add_argument(
        "--attack", nargs="+", default=None, help="none | pgd | apgd-ce | apgd-t | aa | autoattack (several allowed)"
    )
    p.add_argument(
        "--eps",
        nargs="+",
        default=None,
        help="radii as fractions of the pixel range, e.g. 1/255 4/255 (linf: at most 1; l2: any length, e.g. 0.5); "
        "default 1/255 2/255 4/255",
    )
    p.add_argument("--norm", default=None, choices=["linf", "l2"], help="default linf")
    p.add_argument("--steps", type=whole_number(1), default=None, help="attack iterations (default: PGD 10, APGD 100)")
    p.add_argument("--restarts", type=whole_number(1), default=None)
    p.add_argument("--batch-size", type=whole_number(1), default=128)
    p.add_argument("--workers", type=whole_number(0), default=0)
    p.add_argument(
        "--logit-scale",
        type=logit_scale_arg,
        default=100.0,
        help="fixed scale (default 100) or 'model' for the model's learned scale",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun, cuda is each process's own GPU)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32 (default) or bf16 (autocast; robust accuracy checked against fp32 on the first batch, "
        "refused beyond 1 point)",
    )
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0)
    p.add_argument(
        "--download", action="store_true", help="let torchvision download the dataset (never done otherwise)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--out",
        required=True,
        help="output folder for results.json and results.md (an interrupted run, "
        "rerun with the same arguments, continues from the journal in OUT/journal)",
    )


#: The flags of the data layer's fields.
EVAL_DATA_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "split": "--split"}
#: The flags of the library's fields in ``mmtard eval`` (errors raised by the library name its fields).
EVAL_FLAGS = {
    **EVAL_DATA_FLAGS,
    "classnames": "--data-dir",
    "classes": "--classes",
    "samples": "--samples",
    "batch_size": "--batch-size",
    "num_workers": "--workers",
    "logit_scale": "--logit-scale",
    "attack": "--attack",
    "eps": "--eps",
    "norm": "--norm",
    "steps": "--steps",
    "restarts": "--restarts",
    "seed": "--seed",
    "model": "--model",
    "pretrained": "--pretrained",
    "precision": "--precision",
    "subset": "--subset",
    "vision_weights": "--vision-weights",
    "vision_weights_alpha": "--vision-weights-alpha",
}


def check_device_here(requested: str | None, field: str):
    """:func:`mmtard.preflight.check_device`, and the device's backend is built into this torch (``mps``
    only exists on Apple machines).

    Raises:
        ConfigError: naming ``field``.
    """
    import torch

    from mmtard.preflight import check_device

    device = check_device(requested, field)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{field}: {requested!r} asked for, but this machine has no MPS backend (Apple GPUs only); use cpu"
        )
    return device


#: what ``mmtard eval`` uses for a flag not given (with --suite, the suite sets these instead)
EVAL_DEFAULTS = {"split": "test", "attack": ["pgd"], "eps": ["1/255", "2/255", "4/255"], "norm": "linf"}


@dataclass
class EvalPlan:
    """What ``mmtard eval`` runs, resolved from its flags: one request per group of datasets (a suite has
    one per dataset: each its split and sample count)."""

    requests: list
    device: str
    suite: object = None


def _suite_flags(args: argparse.Namespace) -> None:
    """With --suite, the flags the suite sets are refused (one line naming the flag)."""
    for flag in ("split", "samples", "attack", "eps", "norm"):
        if getattr(args, flag) is not None:
            raise ConfigError(
                f"--{flag}: set by --suite {args.suite}; leave it out, or write a suite file with your own {flag}"
            )
    if len(args.data_dir) != 1 or args.data_dir[0] is None:
        raise ConfigError("--data-dir: with --suite, give one root folder holding each dataset as ROOT/<name>")


def check_eval_args(args: argparse.Namespace) -> EvalPlan:
    """Everything ``mmtard eval`` can check before it loads a model or writes a file.

    Returns:
        The evaluation requests (datasets, folders, attacks, radii...) and the device.
    """
    from mmtard.attacks import list_attacks
    from mmtard.eval.run import EvalRequest
    from mmtard.eval.subset import read_subset
    from mmtard.eval.suite import check_suite_data, load_suite, select_datasets
    from mmtard.eval.zeroshot import check_precision
    from mmtard.models import check_checkpoint_file
    from mmtard.preflight import check_data, check_model, check_output_dir, renamed_fields
    from mmtard.units import parse_eps

    suite = None
    if args.suite is not None:
        _suite_flags(args)
        suite = load_suite(args.suite, "--suite")
        attacks, eps_texts, norm = list(suite.attacks), list(suite.eps), suite.norm
    else:
        if not args.dataset:
            raise ConfigError("--dataset: give one or more datasets, or --suite (e.g. --suite robustvlm)")
        attacks = args.attack or EVAL_DEFAULTS["attack"]
        eps_texts = args.eps or EVAL_DEFAULTS["eps"]
        norm = args.norm or EVAL_DEFAULTS["norm"]
        if len(args.data_dir) not in (1, len(args.dataset)):
            raise ConfigError(
                f"--data-dir: give one folder for all datasets or one per dataset ({len(args.dataset)}), "
                f"got {len(args.data_dir)}"
            )
    eps = [parse_eps(text, "--eps", norm) for text in eps_texts]
    known = ["none", *list_attacks()]
    for name in attacks:
        if name not in known:
            raise ConfigError(f"--attack: unknown attack {name!r}; expected one of {', '.join(known)}")
    with renamed_fields(EVAL_FLAGS):
        check_precision(args.precision)
    device = str(check_device_here(args.device, "--device"))
    check_output_dir(args.out, "--out")
    check_model(args.model, args.pretrained, "--model", "--pretrained", trust_checkpoint=args.trust_checkpoint)
    if args.vision_weights is not None:
        check_checkpoint_file(args.vision_weights, "--vision-weights", trust_checkpoint=args.trust_checkpoint)
    subset = read_subset(args.subset, "--subset") if args.subset is not None else None
    if subset is not None and args.samples is not None:
        raise ConfigError("--samples: give --samples or --subset, not both (a subset fixes the images)")
    common = dict(
        classes=args.classes,
        attacks=attacks,
        eps=eps,
        norm=norm,
        steps=args.steps,
        restarts=args.restarts,
        batch_size=args.batch_size,
        num_workers=args.workers,
        logit_scale=args.logit_scale,
        seed=args.seed,
        download=args.download,
        progress=not args.no_progress,
        journal_dir=os.path.join(args.out, "journal"),  # an interrupted run, rerun as it was, continues
        precision=args.precision,
        subset=subset,
    )
    if suite is not None:
        chosen = select_datasets(suite, args.dataset, "--dataset")
        folders = check_suite_data(chosen, args.data_dir[0], suite.name, "--data-dir")
        requests = [
            EvalRequest(
                datasets=[entry.name],
                data_dirs=[folder],
                split=entry.split,
                samples=None if subset is not None else entry.samples,
                **common,
            )
            for entry, folder in zip(chosen, folders)
        ]
        return EvalPlan(requests, device, suite)
    split = args.split or EVAL_DEFAULTS["split"]
    data_dirs = args.data_dir if len(args.data_dir) == len(args.dataset) else args.data_dir * len(args.dataset)
    for name, folder in zip(args.dataset, data_dirs):
        check_data(name, folder, split, EVAL_DATA_FLAGS, args.download)
    request = EvalRequest(datasets=args.dataset, data_dirs=data_dirs, split=split, samples=args.samples, **common)
    return EvalPlan([request], device)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from mmtard.distributed import start_eval_processes
    from mmtard.eval.report import markdown_table, write_results
    from mmtard.eval.run import evaluate_bundle
    from mmtard.eval.suite import suite_table, suite_wide_table
    from mmtard.fileio import reported_write_errors
    from mmtard.models import load_clip
    from mmtard.preflight import renamed_fields

    plan = check_eval_args(args)
    with renamed_fields({"device": "--device"}):
        start_eval_processes(plan.device)  # under torchrun: each process its share of the batches; else nothing
    journal_dir = os.path.join(args.out, "journal")  # an interrupted run, rerun as it was, continues
    with (
        leave_as_found(Path(args.out), inside=["journal"]),
        reported_write_errors("--out", args.out),
        renamed_fields(EVAL_FLAGS),
    ):
        torch.manual_seed(args.seed)  # random weights (--pretrained none) are the same in every run of a seed
        bundle = load_clip(
            args.model,
            args.pretrained,
            device=plan.device,
            trust_checkpoint=args.trust_checkpoint,
            vision_weights=args.vision_weights,
            vision_weights_alpha=args.vision_weights_alpha,
        )
        records = [record for request in plan.requests for record in evaluate_bundle(bundle, request)]
        if plan.suite is not None:
            table = suite_table(records, plan.suite)
            table += "\n\n## The field's layout\n\n" + suite_wide_table(records, plan.suite)
            paths = write_results(args.out, records, table=table, extra={"suite": plan.suite.describe()})
        else:
            table = markdown_table(records)
            paths = write_results(args.out, records)
    shutil.rmtree(journal_dir, ignore_errors=True)  # the results are written: nothing left to resume
    print(table)
    for record in records:
        for warning in record["checks"].get("warnings", []):
            print(f"WARNING {record['dataset']}: {warning}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--no-progress", action="store_true")


def train_config(args: argparse.Namespace):
    """The run config: ``--config`` with ``--set``; to resume, the run's saved ``config.yaml`` with ``--set``
    (the file given with ``--config`` then only locates the run folder)."""
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


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
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
    check_device_here(args.device, "--device")
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


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a run or checkpoint as an open_clip or Hugging Face folder with a model card")
    p.add_argument("--model", required=True, help="open_clip architecture (ViT-B-32, ViT-L-14-336, tiny-vit-s, ...)")
    p.add_argument(
        "--pretrained", required=True, help="run folder (model.safetensors + config.yaml), checkpoint file, or tag"
    )
    p.add_argument("--format", default="hf", choices=["open_clip", "hf"], help="hf: transformers CLIPModel folder")
    p.add_argument("--out", required=True, help="export folder (new, or holding a previous export of this format)")
    p.add_argument("--results", nargs="+", default=[], metavar="FILE", help="results.json files for the model card")
    p.add_argument("--license", default=None, help="license identifier for the model card metadata, e.g. mit")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full unpickling of a .pt checkpoint (runs code: only for your own files)",
    )
    _add_vision_weights_flags(p)


def run_export(args: argparse.Namespace) -> int:
    from mmtard.export import export_model
    from mmtard.preflight import renamed_fields

    flags = {"model": "--model", "pretrained": "--pretrained", "out": "--out", "format": "--format"}
    flags |= {"vision_weights": "--vision-weights", "vision_weights_alpha": "--vision-weights-alpha"}
    with renamed_fields(flags):
        paths = export_model(
            args.model,
            args.pretrained,
            args.out,
            format=args.format,
            results=args.results,
            license=args.license,
            trust_checkpoint=args.trust_checkpoint,
            vision_weights=args.vision_weights,
            vision_weights_alpha=args.vision_weights_alpha,
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check datasets: found, layout, class and image counts")
    actions = p.add_subparsers(dest="data_command", required=True)
    check = actions.add_parser("check", help="is each dataset where it should be and readable (exit 0 when all are)")
    check.add_argument("--dataset", nargs="+", default=None, help="registered datasets (with --suite: a part of it)")
    check.add_argument(
        "--data-dir",
        nargs="+",
        required=True,
        help="data folder per dataset (one for all, or one each); with --suite, the root holding ROOT/<dataset>",
    )
    check.add_argument("--suite", default=None, help="check a suite's datasets (robustvlm or a suite file)")
    check.add_argument("--split", default=None, help="the split to list (default: val for imagenet, test otherwise)")


def run_data(args: argparse.Namespace) -> int:
    from mmtard.data.check import check_dataset, format_checks
    from mmtard.eval.suite import load_suite, select_datasets
    from mmtard.preflight import renamed_fields

    if args.suite is not None:
        if len(args.data_dir) != 1:
            raise ConfigError("--data-dir: with --suite, give one root folder holding each dataset as ROOT/<name>")
        entries = select_datasets(load_suite(args.suite, "--suite"), args.dataset, "--dataset")
        targets = [(e.name, Path(args.data_dir[0]) / e.name, args.split or e.split) for e in entries]
    else:
        if not args.dataset:
            raise ConfigError("--dataset: give one or more datasets, or --suite")
        if len(args.data_dir) not in (1, len(args.dataset)):
            raise ConfigError(
                f"--data-dir: give one folder for all datasets or one per dataset ({len(args.dataset)}), "
                f"got {len(args.data_dir)}"
            )
        folders = args.data_dir if len(args.data_dir) == len(args.dataset) else args.data_dir * len(args.dataset)
        targets = [(name, folder, args.split) for name, folder in zip(args.dataset, folders)]
    with renamed_fields({"dataset": "--dataset"}):
        checks = [check_dataset(name, folder, split) for name, folder, split in targets]
    print(format_checks(checks))
    return 0 if all(c.usable for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mmtard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval_parser(sub)
    _add_train_parser(sub)
    _add_demo_parser(sub)
    _add_export_parser(sub)
    _add_data_parser(sub)
    for command in sub.choices.values():  # also accepted after the command: mmtard train ... --debug
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


COMMANDS = {"eval": run_eval, "train": run_train, "demo": run_demo, "export": run_export, "data": run_data}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    prefix = f"mmtard {args.command}:"
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except WorkerTimeoutError as exc:  # a fault of the machine, not of the input: exit code 1
        if args.debug:
            raise
        print(f"{prefix} error: {one_line(exc)}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{prefix} error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
