"""Results files of ``mmtard eval``: ``results.json`` (schema in README) and ``results.md``."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

from mmtard.distributed import Shard
from mmtard.eval.subset import SUBSET_FILE, subset_file
from mmtard.fileio import atomic_path, atomic_write_text
from mmtard.models.loading import RANDOM_INIT

logger = logging.getLogger(__name__)

_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.+-]+")


def robust_column(entry: dict) -> str:
    """Column title naming everything that produced a robust number: attack, norm, eps, steps, restarts
    (``pgd linf 4/255 (10 steps, 1 restart)``; an L2 radius of 0.5 is ``pgd l2 0.5 ...``)."""
    plural = "s" if entry["restarts"] != 1 else ""
    norm = f"{entry['norm']} " if entry.get("norm") else ""
    return f"{entry['attack']} {norm}{entry['eps']} ({entry['steps']} steps, {entry['restarts']} restart{plural})"


def weights_text(pretrained: object, digest: object) -> str:
    """What ``--pretrained`` loaded: a file with its SHA-256, random weights, or an open_clip tag / hub id."""
    if digest:
        return f"`{pretrained}`, SHA-256 `{digest}`"
    if str(pretrained or "").lower() in RANDOM_INIT:
        return f"random initialisation (`--pretrained {pretrained or 'none'}`)"
    return f"`{pretrained}` (an open_clip pretrained tag or hub id)"


def evaluated_lines(records: list[dict], suite: dict | None = None) -> list[str]:
    """What was evaluated, as ``results.json`` records it: the model, its weights (a file's SHA-256), the
    image-tower file with its SHA-256 and alpha, and the suite."""
    lines = []
    keys = ("model", "pretrained", "pretrained_sha256", "vision_weights", "vision_weights_sha256")
    for model, pretrained, digest, tower, tower_digest in dict.fromkeys(
        tuple(record.get(k) for k in keys) for record in records
    ):
        lines += [f"- Model: `{model}`", f"- Weights: {weights_text(pretrained, digest)}"]
        if tower:
            alpha = next(r.get("vision_weights_alpha") for r in records if r.get("vision_weights") == tower)
            lines.append(
                f"- Image tower: `{tower}`, SHA-256 `{tower_digest}`, alpha {alpha} "
                "(alpha x the file's tower + (1 - alpha) x the base tower)"
            )
        else:
            lines.append("- Image tower: the weights' own (no --vision-weights)")
    if suite:
        lines.append(f"- Suite: `{suite.get('name')}` (`{suite.get('source')}`)")
    return lines


def result_names(records: list[dict]) -> list[str]:
    """A distinct name per record, for its results folder and table row.

    A dataset evaluated once is named by itself (``cifar10``). Records that share a dataset (several
    ``--data-dir`` folders of one kind, e.g. CIFAR-10-C corruptions as ``npz``) add their data folder's name
    (``npz-gaussian_noise``), or their position among them (``npz-1``, ``npz-2``) when folder names repeat.
    """
    per_dataset = Counter(record["dataset"] for record in records)
    folders: dict[str, list[str]] = {}
    for record in records:
        folder = Path(record.get("data_dir") or "").name
        folders.setdefault(record["dataset"], []).append(_UNSAFE_NAME_CHARACTERS.sub("_", folder).strip("_."))
    names, seen = [], Counter()
    for record in records:
        dataset = record["dataset"]
        seen[dataset] += 1
        if per_dataset[dataset] == 1:
            names.append(dataset)
            continue
        group = folders[dataset]
        distinct = all(group) and len(set(group)) == len(group)
        names.append(f"{dataset}-{group[seen[dataset] - 1]}" if distinct else f"{dataset}-{seen[dataset]}")
    return names


def markdown_table(records: list[dict]) -> str:
    """One row per (model, dataset) record, clean accuracy then each robust setting, in percent.

    The dataset column holds :func:`result_names`, so several folders of one dataset kind are told apart.
    """
    columns: list[str] = []
    for record in records:
        for entry in record["robust"]:
            if robust_column(entry) not in columns:
                columns.append(robust_column(entry))
    header = ["model", "dataset", "samples", "clean", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record, name in zip(records, result_names(records)):
        values = {robust_column(e): f"{e['acc']:.1f}" for e in record["robust"]}
        cells = [record["model"], name, str(record["samples"]), f"{record['clean_acc']:.1f}"]
        cells += [values.get(c, "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    out_dir: str | Path,
    records: list[dict],
    shard: Shard | None = None,
    *,
    table: str | None = None,
    extra: dict | None = None,
) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``subset.json`` (every record's images, for ``--subset``);
    return their paths.

    One dataset: ``out_dir/results.json`` is that dataset's record. Several: each record goes to
    ``out_dir/<name>/results.json`` (``name`` from :func:`result_names`: the dataset, plus the data folder's
    name when several folders share a dataset) and ``out_dir/results.json`` holds ``{"results": [records]}``.
    Under ``torchrun`` (``shard``, by default the initialised process group's) only rank 0 writes; the
    other processes get the same paths and write nothing. ``table`` replaces the markdown table of
    ``results.md`` (a suite's); ``extra`` adds keys to the top level of a several-record ``results.json``.
    """
    out = Path(out_dir)
    names = result_names(records)
    per_record = [out / name / "results.json" for name in names] if len(records) > 1 else []
    written = [*per_record, out / "results.json", out / "results.md", out / SUBSET_FILE]
    if not (Shard.from_process_group() if shard is None else shard).is_main:
        return written
    out.mkdir(parents=True, exist_ok=True)
    for record, path in zip(records, per_record):
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2))
    payload: dict = records[0] if len(records) == 1 and not extra else {**(extra or {}), "results": records}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    atomic_write_text(out / SUBSET_FILE, json.dumps(subset_file(records), indent=1))
    warnings = [f"- {name}: {w}" for r, name in zip(records, names) for w in r.get("checks", {}).get("warnings", [])]
    what = "\n".join(evaluated_lines(records, (extra or {}).get("suite")))
    body = f"# Zero-shot evaluation\n\n{what}\n\nAccuracy in percent; robust columns name attack, norm and eps.\n\n"
    body += (table or markdown_table(records)) + "\n"
    body += "\n## Gradient-masking checks\n\n" + ("\n".join(warnings) if warnings else "All checks passed.") + "\n"
    atomic_write_text(out / "results.md", body)
    return written


FRONTIER_FILES = ("frontier.md", "frontier.json", "frontier.png")


def frontier_table(records_by_alpha: dict[float, list[dict]]) -> str:
    """One row per alpha and dataset: clean accuracy and each robust setting, in percent (a weight-space
    interpolation frontier, ``mmtard eval --vision-weights-alpha A1 A2 ...``)."""
    rows = [(alpha, record) for alpha, records in sorted(records_by_alpha.items()) for record in records]
    columns = list(dict.fromkeys(robust_column(e) for _, record in rows for e in record["robust"]))
    header = ["alpha", "dataset", "samples", "clean", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for alpha, record in rows:
        values = {robust_column(e): f"{e['acc']:.1f}" for e in record["robust"]}
        cells = [f"{alpha:g}", record["dataset"], str(record["samples"]), f"{record['clean_acc']:.1f}"]
        lines.append("| " + " | ".join(cells + [values.get(c, "") for c in columns]) + " |")
    return "\n".join(lines)


def write_frontier(out_dir: str | Path, records_by_alpha: dict[float, list[dict]]) -> list[Path]:
    """``frontier.md`` (what was evaluated, then :func:`frontier_table`), ``frontier.json`` (alpha -> records) and,
    with matplotlib installed (the ``plots`` extra), ``frontier.png``: clean against robust accuracy, one line per
    dataset and robust setting through the alphas. Returns the files written."""
    out = Path(out_dir)
    first = next(iter(records_by_alpha.values()))
    text = "\n".join(evaluated_lines(first)) + "\n\n## Interpolation frontier\n\n" + frontier_table(records_by_alpha)
    paths = [out / "frontier.md", out / "frontier.json"]
    atomic_write_text(paths[0], text + "\n")
    atomic_write_text(paths[1], json.dumps({f"{a:g}": r for a, r in sorted(records_by_alpha.items())}, indent=1))
    try:
        import matplotlib
    except ImportError:
        logger.warning("frontier.png not drawn: matplotlib is not installed (pip install 'mmtard[plots]')")
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    alphas = sorted(records_by_alpha)
    for index, record in enumerate(first):
        for entry in record["robust"]:
            column = robust_column(entry)
            points = []
            for alpha in alphas:
                at_alpha = records_by_alpha[alpha][index]
                points += [(at_alpha["clean_acc"], e["acc"]) for e in at_alpha["robust"] if robust_column(e) == column]
            ax.plot(*zip(*points), marker="o", label=f"{record['dataset']}: {column}")
            for alpha, (x, y) in zip(alphas, points):
                ax.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("weight-space interpolation frontier (labels: alpha)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "frontier.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [*paths, out / "frontier.png"]
