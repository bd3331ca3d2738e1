"""``mmtard eval``: its flags, the checks before anything is loaded or written, and the run."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmtard.cli.common import (
    EVAL_DATA_FLAGS,
    add_vision_weights_flags,
    check_dataset_folders,
    eval_lock,
    leave_as_found,
    logit_scale_arg,
    whole_number,
)
from mmtard.distributed import check_device
from mmtard.errors import ConfigError
from mmtard.validate import MAX_SEED

if TYPE_CHECKING:  # imported where used: they load the models' and datasets' libraries
    from mmtard.eval.run import EvalRequest
    from mmtard.eval.suite import Suite

#: the flags that set a field of the library's :class:`~mmtard.eval.run.EvalRequest` (flag's dest -> field); a flag
#: left out leaves the field's default, defined there only
REQUEST_FLAGS = {
    "split": "split",
    "samples": "samples",
    "attack": "attacks",
    "eps": "eps",
    "norm": "norm",
    "steps": "steps",
    "restarts": "restarts",
    "batch_size": "batch_size",
    "workers": "num_workers",
    "logit_scale": "logit_scale",
    "seed": "seed",
    "precision": "precision",
    "part": "part",
}


class RequestDefaultsHelp(argparse.HelpFormatter):
    """``mmtard eval --help`` says each request flag's default, read from ``EvalRequest`` (imported only then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        field = REQUEST_FLAGS.get(action.dest)
        if field is None:
            return action.help
        from mmtard.eval.run import EvalRequest
        from mmtard.units import format_eps

        default = getattr(EvalRequest, field)
        if default is None:
            return action.help
        if field == "eps":
            shown = " ".join(format_eps(eps) for eps in default)
        elif isinstance(default, tuple):
            shown = " ".join(default)
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{action.help} (default: {shown})" if action.help else f"default: {shown}"


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="clean and robust zero-shot accuracy of a CLIP model", formatter_class=RequestDefaultsHelp
    )
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
    add_vision_weights_flags(p, several_alphas=True)
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
    p.add_argument("--split", default=None, help="the split to read")
    p.add_argument("--classes", default=None, help="all | seen | unseen | class names (default: all, or a --subset's)")
    p.add_argument("--samples", type=whole_number(1), default=None, help="fixed class-balanced subset of N images")
    p.add_argument(
        "--part",
        default=None,
        metavar="K/N",
        help="only the K-th of N disjoint class-balanced parts of the split (e.g. 2/2: the half a student distilled "
        "on part 1/2 never saw), before --classes and --samples",
    )
    p.add_argument(
        "--attack", nargs="+", default=None, help="none | pgd | apgd-ce | apgd-t | aa | autoattack, several allowed"
    )
    p.add_argument(
        "--eps",
        nargs="+",
        default=None,
        help="radii as fractions of the pixel range, e.g. 1/255 4/255 (linf: at most 1; l2: any length, e.g. 0.5)",
    )
    p.add_argument("--norm", default=None, choices=["linf", "l2"], help="the radii's norm")
    p.add_argument("--steps", type=whole_number(1), default=None, help="attack iterations (default: PGD 10, APGD 100)")
    p.add_argument(
        "--restarts", type=whole_number(1), default=None, help="attack restarts (default: each attack's own)"
    )
    p.add_argument("--batch-size", type=whole_number(1), default=None, help="images per batch")
    p.add_argument("--workers", type=whole_number(0), default=None, help="DataLoader worker processes")
    p.add_argument(
        "--logit-scale",
        type=logit_scale_arg,
        default=None,
        help="a fixed scale or 'model' for the model's learned scale",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun, cuda is each process's own GPU)",
    )
    p.add_argument(
        "--precision",
        default=None,
        help="fp32 or bf16 (autocast; robust accuracy checked against fp32 on the first batch, refused beyond 1 point)",
    )
    p.add_argument(
        "--seed",
        type=whole_number(0, MAX_SEED),
        default=None,
        help="seed of the --samples draw, the attacks' random starts and random weights",
    )
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
    "part": "--part",
    "vision_weights": "--vision-weights",
    "vision_weights_alpha": "--vision-weights-alpha",
}

#: with --suite, the fields the suite sets are named as the suite's keys (the flags are refused with it)
SUITE_FLAGS = EVAL_FLAGS | {key: f"--suite {key}" for key in ("split", "samples", "attack", "eps", "norm")}


@dataclass
class EvalPlan:
    """What ``mmtard eval`` runs, resolved from its flags: one request per group of datasets (a suite has
    one per dataset: each its split and sample count), and the flag (or suite key) that names each request field
    in an error."""

    requests: list[EvalRequest]
    device: str
    flags: dict[str, str]
    suite: Suite | None = None


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
    """Everything ``mmtard eval`` can check before it loads a model or writes a file: the flags become the
    library's requests (:func:`eval_requests`), which the library checks (:func:`mmtard.eval.run.check_eval_request`,
    its errors naming the flags), then the device, the output folder and the model files.

    Returns:
        The evaluation requests (datasets, folders, attacks, radii...), the device and the flags.
    """
    from mmtard.eval.run import check_eval_request
    from mmtard.models import check_checkpoint_file
    from mmtard.preflight import check_model, check_output_dir, renamed_fields

    suite = read_dataset_flags(args)
    requests = eval_requests(args, suite)
    flags = EVAL_FLAGS if suite is None else SUITE_FLAGS
    with renamed_fields(flags):
        for request in requests:
            check_eval_request(request)
    device = str(check_device(args.device, "--device"))
    check_output_dir(args.out, "--out")
    check_model(args.model, args.pretrained, "--model", "--pretrained", trust_checkpoint=args.trust_checkpoint)
    if args.vision_weights is not None:
        check_checkpoint_file(args.vision_weights, "--vision-weights", trust_checkpoint=args.trust_checkpoint)
    return EvalPlan(requests, device, flags, suite)


def read_dataset_flags(args: argparse.Namespace) -> Suite | None:
    """The suite of ``--suite`` (the flags it sets left out, its attacks known), or None after checking the flags
    without one: ``--dataset`` given, and one ``--data-dir`` for all or one per dataset."""
    from mmtard.eval.run import check_attack_names
    from mmtard.eval.suite import load_suite

    if args.suite is not None:
        _suite_flags(args)
        suite = load_suite(args.suite, "--suite")
        check_attack_names(suite.attacks, f"--suite: '{suite.source}': attacks")
        return suite
    check_dataset_folders(args.dataset, args.data_dir)
    return None


def eval_requests(args: argparse.Namespace, suite: Suite | None) -> list[EvalRequest]:
    """The flags as the library's ``EvalRequest`` s: one for the datasets given, or one per dataset of ``suite``
    (each its split and sample count). A flag left out leaves the request's default; ``--eps`` is read in the
    request's norm; ``--subset`` is read here."""
    from mmtard.eval.run import EvalRequest
    from mmtard.eval.subset import classes_for_subset, read_subset
    from mmtard.eval.suite import check_suite_data, select_datasets
    from mmtard.units import parse_eps

    given = {field: getattr(args, flag) for flag, field in REQUEST_FLAGS.items() if getattr(args, flag) is not None}
    if suite is not None:
        given.update(attacks=list(suite.attacks), eps=list(suite.eps), norm=suite.norm)
    if "eps" in given:
        given["eps"] = [parse_eps(text, "--eps", given.get("norm", EvalRequest.norm)) for text in given["eps"]]
    subset = read_subset(args.subset, "--subset") if args.subset is not None else None
    given.update(
        classes=classes_for_subset(args.classes, subset, args.dataset),
        download=args.download,
        progress=not args.no_progress,
        journal_dir=os.path.join(args.out, "journal"),  # an interrupted run, rerun as it was, continues
        subset=subset,
    )
    if suite is None:
        data_dirs = args.data_dir if len(args.data_dir) == len(args.dataset) else args.data_dir * len(args.dataset)
        return [EvalRequest(datasets=args.dataset, data_dirs=data_dirs, **given)]
    chosen = select_datasets(suite, args.dataset, "--dataset")
    folders = check_suite_data(chosen, args.data_dir[0], suite.name, "--data-dir")
    return [
        EvalRequest(
            datasets=[entry.name],
            data_dirs=[folder],
            split=entry.split,
            samples=None if subset is not None else entry.samples,
            **given,
        )
        for entry, folder in zip(chosen, folders)
    ]


def run_eval(args: argparse.Namespace) -> int:
    from mmtard.distributed import start_eval_processes
    from mmtard.eval.report import write_frontier
    from mmtard.fileio import reported_write_errors
    from mmtard.preflight import renamed_fields

    plan = check_eval_args(args)
    with renamed_fields({"device": "--device"}):
        start_eval_processes(plan.device)  # under torchrun: each process its share of the batches; else nothing
    alphas = list(dict.fromkeys(args.vision_weights_alpha))
    if len(alphas) == 1:
        evaluate_weights(args, plan, alphas[0], Path(args.out))
        return 0
    # several alphas: the frontier of the weight-space interpolation, one evaluation per alpha in OUT/alpha<A>/
    by_alpha = {alpha: evaluate_weights(args, plan, alpha, Path(args.out) / f"alpha{alpha:g}") for alpha in alphas}
    with reported_write_errors("--out", args.out):
        paths = write_frontier(args.out, by_alpha)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def evaluate_weights(args: argparse.Namespace, plan: EvalPlan, alpha: float, out: Path) -> list[dict]:
    """Evaluate the model with image-tower weight ``alpha`` into ``out`` (results, journal); its records."""
    import torch

    from mmtard.eval.report import markdown_table, write_results
    from mmtard.eval.run import evaluate_bundle
    from mmtard.eval.suite import suite_table, suite_wide_table
    from mmtard.fileio import reported_write_errors
    from mmtard.models import load_clip
    from mmtard.preflight import renamed_fields

    journal_dir = out / "journal"  # an interrupted run, rerun as it was, continues
    requests = [replace(request, journal_dir=str(journal_dir)) for request in plan.requests]
    with (
        leave_as_found(out, inside=["journal"]),
        reported_write_errors("--out", str(out)),
        renamed_fields(plan.flags),
        eval_lock(journal_dir),
    ):
        torch.manual_seed(requests[0].seed)  # random weights (--pretrained none) are the same in every run of a seed
        bundle = load_clip(
            args.model,
            args.pretrained,
            device=plan.device,
            trust_checkpoint=args.trust_checkpoint,
            vision_weights=args.vision_weights,
            vision_weights_alpha=alpha,
        )
        records = [record for request in requests for record in evaluate_bundle(bundle, request)]
        if plan.suite is not None:
            table = suite_table(records, plan.suite)
            table += "\n\n## The field's layout\n\n" + suite_wide_table(records, plan.suite)
            paths = write_results(out, records, table=table, extra={"suite": plan.suite.describe()})
        else:
            table = markdown_table(records)
            paths = write_results(out, records)
    shutil.rmtree(journal_dir, ignore_errors=True)  # the results are written: nothing left to resume
    print(table)
    for record in records:
        for warning in record["checks"].get("warnings", []):
            print(f"WARNING {record['dataset']}: {warning}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return records
