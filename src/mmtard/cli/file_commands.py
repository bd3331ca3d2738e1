"""``mmtard export`` and ``mmtard data check``: flags, checks and the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtard.cli.common import (
    add_vision_weights_flags,
    check_dataset_folders,
)
from mmtard.errors import ConfigError


def add_export_parser(sub: argparse._SubParsersAction) -> None:
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
    add_vision_weights_flags(p)


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


def add_data_parser(sub: argparse._SubParsersAction) -> None:
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
    check.add_argument(
        "--quick", action="store_true", help="decode 100 image files spread over each split, not every one"
    )


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
        check_dataset_folders(args.dataset, args.data_dir)
        folders = args.data_dir if len(args.data_dir) == len(args.dataset) else args.data_dir * len(args.dataset)
        targets = [(name, folder, args.split) for name, folder in zip(args.dataset, folders)]
    with renamed_fields({"dataset": "--dataset"}):
        checks = [check_dataset(name, folder, split, quick=args.quick) for name, folder, split in targets]
    print(format_checks(checks))
    return 0 if all(c.usable for c in checks) else 1
