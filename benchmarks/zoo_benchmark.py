"""The zoo benchmark: MMT-ARD against its baselines on the CIFAR-10 zoo (spec section 5), and its calibration.

Run by hand, not in CI (times in README "Benchmarks"; a GPU machine runs the whole grid with ``--jobs 16``, see
``benchmarks/gpu_run.sh``):

    python ../shared/zoo/rebuild.py --out runs/zoo
    python benchmarks/zoo_benchmark.py --calibrate lr1e-3 lr2e-3 --seeds 0 --out runs/bench-zoo --jobs 2
    python benchmarks/zoo_benchmark.py --out runs/bench-zoo --jobs 2 --docs docs/benchmarks

The foundations and teachers are the zoo's GPU-trained tiny CLIPs (tiny-vit-s student foundation, tiny-vit-l
teachers), evaluated here and never trained. Students are the cells of ``mmtard.experiments.cells`` trained with a
recipe (``--recipe``, default the calibrated one): a job is a cell, a recipe and a seed, in
``<out>/student-<cell>-<recipe>-seed<seed>/``; a finished job is reused, so stop and rerun at will.

- ``--calibrate RECIPE...``: the calibration grid: ``tecoa`` and ``ard`` with each recipe, for the targets of issue
  16 (a recipe in which adversarial fine-tuning forgets zero-shot accuracy as it does at scale).
- Otherwise: the baselines and the candidate cells (``--cells``) on every seed, mmt-ard's ablation cells
  (``--ablation``) on the first seed.

Every student is evaluated on seen and unseen test images: clean accuracy on every test image of the split, PGD-10
at 1, 2 and 4/255 and (unless ``--no-aa``) ``aa`` (APGD-CE + APGD-T, 100 iterations each) at 4/255 on the same
``--eval-samples`` class-balanced images for every model. Each cell's difference against ``ard`` carries a 95%
paired bootstrap interval over images and seeds. Writes ``<out>/benchmark.md`` and ``benchmark.json`` as students
finish, the plots, and with ``--docs DIR`` the headline records (``zoo-headline.json``, one per cell and split),
``pareto.png`` (aa), ``pareto_pgd.png`` (PGD-10) and ``lambda_r.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtard.attacks.checks import check_robust_results  # noqa: E402
from mmtard.experiments import ZOO_SCALE, ProtocolScale, run_protocol  # noqa: E402
from mmtard.experiments.cells import (  # noqa: E402
    ABLATION,
    BASELINES,
    CALIBRATED,
    CALIBRATION,
    CELLS,
    RECIPES,
    Frontier,
    Job,
    make_jobs,
)
from mmtard.experiments.per_image import write_per_image  # noqa: E402
from mmtard.experiments.protocol import DISTILL_IMAGES, GIVEN_STAGES, evaluate_stage, given_models  # noqa: E402
from mmtard.experiments.protocol_check import check_table, measure_teachers, preconditions  # noqa: E402
from mmtard.experiments.report import (  # noqa: E402
    clean_accuracy,
    mean_std,
    plot_lambda_trajectories,
    plot_pareto,
    robust_accuracy,
)
from mmtard.experiments.stats import frontier_margin, paired_bootstrap  # noqa: E402
from mmtard.fileio import atomic_write_text  # noqa: E402
from mmtard.train import RunDir  # noqa: E402

SPLITS = ("seen", "unseen")
PROTOCOL_CHECK_SAMPLES = 512  # class-balanced seen-class images per image set in the protocol check
EPS = ("1/255", "2/255", "4/255")
TARGET_EPS = "4/255"
#: issue 16's targets for the calibrated recipe: preset -> (highest unseen clean, lowest seen PGD-10 4/255)
CALIBRATION_TARGETS = {"tecoa": (60.0, 35.0), "ard": (66.0, 30.0)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo", help="the rebuilt zoo (python ../shared/zoo/rebuild.py --out DIR)")
    p.add_argument("--out", default=None, help="default runs/bench-xfer (transfer) or runs/bench-zoo (train)")
    p.add_argument(
        "--distill-images",
        default="transfer",
        choices=sorted(DISTILL_IMAGES),
        help="transfer (default): students distil on half of the seen classes' test images, which no zoo model "
        "trained on, and are evaluated on the other half; train: on train.npz, which the teachers memorised "
        "(issue 16's tables)",
    )
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", default=CALIBRATED, choices=sorted(RECIPES), help="the students' training recipe")
    p.add_argument("--calibrate", nargs="+", metavar="RECIPE", help="run the calibration grid over these recipes")
    p.add_argument(
        "--cells", nargs="+", default=[*BASELINES, "mmt-ard"], help="cells trained on every seed ('all': every cell)"
    )
    p.add_argument("--ablation", nargs="*", default=list(ABLATION), help="cells trained on the first seed only")
    p.add_argument("--batch-size", type=int, default=ZOO_SCALE.batch_size)
    p.add_argument("--eval-samples", type=int, default=500, help="test images per split for PGD-10 and aa")
    p.add_argument("--eval-every", type=int, default=ZOO_SCALE.eval_every, help="held-out PGD period in training")
    p.add_argument("--no-aa", action="store_true", help="PGD-10 only")
    p.add_argument(
        "--zoo-models",
        nargs="+",
        default=list(GIVEN_STAGES),
        choices=GIVEN_STAGES,
        help="which of the zoo's own models to evaluate (default: all four)",
    )
    p.add_argument("--no-zoo-models", action="store_true", help="do not evaluate the zoo's own models")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="students trained (and evaluated) at once, one thread each; with 1, torch's own thread count (set "
        "OMP_NUM_THREADS=1 when two runs share the cores: two 2-thread runs on 2 cores step about 2.5x slower)",
    )
    p.add_argument("--report-only", action="store_true", help="train nothing: the tables of the students on disk")
    p.add_argument(
        "--frontier",
        nargs="*",
        default=["ard", "ard_rslad", "tecoa"],
        help="cells whose finished students get the interpolation control (with the student foundation; PGD-10 at "
        "4/255 only)",
    )
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="the frontier's weights")
    p.add_argument(
        "--against",
        nargs="+",
        default=[],
        metavar="CELL",
        help="more baselines: the differences (and the frontier margins, where the cell has interp controls) "
        "against each of these cells' students too (e.g. ard_lora for the LoRA students)",
    )
    p.add_argument("--docs", default=None, help="also write zoo-headline.json, pareto.png, lambda_r.png here")
    args = p.parse_args(argv)
    args.cells = list(CELLS) if args.cells == ["all"] else args.cells
    if args.out is None:
        args.out = "runs/bench-xfer" if args.distill_images == "transfer" else "runs/bench-zoo"
    for flag, names, known in (
        ("--cells", args.cells, CELLS),
        ("--ablation", args.ablation, CELLS),
        ("--frontier", args.frontier, CELLS),
        ("--against", args.against, CELLS),
        ("--calibrate", args.calibrate or [], RECIPES),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            p.error(f"{flag}: unknown {unknown}; expected names from {sorted(known)}")
    return args


# ---------------------------------------------------------------- one student


def evaluate_job(
    out: Path, scale: ProtocolScale, row: dict, aa: bool, model: Path | None = None, interpolate=None
) -> dict:
    """``row`` (PGD-10 on ``scale.eval_samples`` images per split) with ``clean_all`` (clean accuracy on every test
    image of each split) and, with ``aa``, the aa record at 4/255 on the same images as PGD-10, its checks comparing
    aa with PGD-10 there. Every evaluation is cached in the row's folder; ``model``: the run folder holding
    ``model.safetensors``, when it is not ``<out>/<stage>`` (the zoo's models); ``interpolate``: ``(base, alpha)``,
    the model interpolated with ``base`` (:func:`mmtard.experiments.protocol.evaluate_stage`)."""
    stage_dir = out / row["stage"]
    model = RunDir(model or stage_dir).model
    every_image = replace(scale, eval_attacks=("none",), eval_samples=None)
    clean = evaluate_stage(every_image, row["arch"], model, stage_dir, False, interpolate)
    row = dict(row, clean_all={split: clean[split] for split in SPLITS})
    if not aa:
        return row
    aa_scale = replace(scale, eval_attacks=("aa",), eval_eps=(4 / 255,), eval_steps=None)
    attacked = evaluate_stage(aa_scale, row["arch"], model, stage_dir, False, interpolate)
    for split in SPLITS:
        record, pgd = attacked[split], row[split]
        if record["outcomes"]["clean"] != pgd["outcomes"]["clean"]:
            raise RuntimeError(f"{row['stage']} {split}: the aa and PGD-10 images differ")
        robust = [e for e in pgd["robust"] if e["eps"] == TARGET_EPS] + record["robust"]
        record["checks"] = check_robust_results(record["clean_acc"], robust, record["checks"]["zero_gradient_fraction"])
    return dict(row, aa=attacked)


def run_job(out: str, scale: ProtocolScale, zoo: str, job: Job, threads: int | None, aa: bool) -> dict:
    """Train (or reuse) and evaluate one student; its row with ``cell``, ``preset`` and ``recipe``."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    (row,) = run_protocol(out, scale, (), (job.seed,), job.variants(), progress=False, zoo=zoo, rows_for={job.stage})
    row |= {"cell": job.cell.name, "preset": job.cell.preset, "recipe": job.recipe.name}
    return evaluate_job(Path(out), scale, row, aa)


def run_given(out: str, scale: ProtocolScale, zoo: str, stage: str, threads: int | None, aa: bool) -> dict:
    """Evaluate one of the zoo's models (never trained) as :func:`evaluate_job` does, without aa."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    (row,) = run_protocol(out, scale, (), (), None, progress=False, zoo=zoo, rows_for={stage})
    return evaluate_job(Path(out), scale, row, aa=False, model=Path(zoo) / stage)


def run_frontier(out: str, scale: ProtocolScale, zoo: str, point: Frontier, threads: int | None, aa: bool) -> dict:
    """Evaluate one interpolated student as :func:`evaluate_job` evaluates a student (PGD-10, clean on every image;
    aa when asked)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    out, job = Path(out), point.job
    student = RunDir(out / job.stage).model
    interpolate = (RunDir(Path(zoo) / "foundation-student").model, point.alpha)
    row = {
        "stage": point.stage,
        "role": "control",
        "control": "interpolation",
        "alpha": point.alpha,
        "method": job.cell.preset,
        "cell": job.cell.name,
        "preset": job.cell.preset,
        "recipe": job.recipe.name,
        "seed": job.seed,
        "arch": scale.student_arch,
        "train_seconds": None,
        "steps": 0,
    }
    target = replace(scale, eval_eps=(4 / 255,))  # the frontier is drawn at the tables' target radius
    row |= evaluate_stage(target, scale.student_arch, student, out / point.stage, False, interpolate)
    return evaluate_job(out, scale, row, aa, model=out / job.stage, interpolate=interpolate)


def stage_of(task: Job | Frontier | str) -> str:
    """A task is a student's job, a frontier point or the name of a zoo model to evaluate."""
    return task if isinstance(task, str) else task.stage


def finished(out: Path, task: Job | str) -> dict | None:
    """A finished task's row as the last run wrote it (``rows/<stage>.json``), or None."""
    path = out / "rows" / f"{stage_of(task)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_tasks(out: Path, scale: ProtocolScale, zoo: str, tasks: list, workers: int, aa: bool, on_row) -> list[str]:
    """Every task not finished yet, ``workers`` at a time; ``on_row(row)`` as each finishes. Returns the failures."""
    failures = []
    todo = [
        t for t in tasks if finished(out, t) is None or (aa and isinstance(t, Job) and "aa" not in finished(out, t))
    ]

    def call(task, threads):
        function = {Job: run_job, Frontier: run_frontier}.get(type(task), run_given)
        return function, str(out), scale, zoo, task, threads, aa

    def done(task, row: dict) -> None:
        (out / "rows").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "rows" / f"{stage_of(task)}.json", json.dumps(row))
        on_row(row)

    if workers <= 1:
        for task in todo:
            function, *arguments = call(task, None)
            done(task, function(*arguments))
        return failures
    context = multiprocessing.get_context("spawn")  # a forked child cannot use CUDA once the parent has
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(*call(task, 1)): task for task in todo}
        for future, task in futures.items():
            try:
                done(task, future.result())
            except Exception as error:  # one student's failure leaves the others' results in the tables
                logging.exception("%s failed", stage_of(task))
                failures.append(f"{stage_of(task)} (failed: {type(error).__name__}: {error})")
    return failures


# ---------------------------------------------------------------- tables


def model_name(row: dict) -> str:
    return row["stage"].rsplit("-seed", 1)[0]


def by_model(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(model_name(row), []).append(row)
    return {name: sorted(group, key=lambda r: r["seed"]) for name, group in groups.items()}


def accuracy_cells(group: list[dict], split: str) -> list[str]:
    """Clean (every image), PGD-10 at each radius and aa at 4/255: mean ± std over the group's seeds (aa over the
    seeds it ran on, named when they are fewer)."""
    clean = [clean_accuracy(r, split) for r in group]
    cells = [mean_std(clean)]
    for eps in EPS:  # a control is attacked at 4/255 only
        values = [robust_accuracy(r[split], "pgd", eps) for r in group]
        cells.append("-" if None in values else mean_std(values))
    with_aa = [r for r in group if "aa" in r]
    if not with_aa:
        return cells + ["-"]
    aa = mean_std([robust_accuracy(r["aa"][split], "aa", TARGET_EPS) for r in with_aa])
    if len(with_aa) < len(group):
        aa += f" (seed {', '.join(str(r['seed']) for r in with_aa)})"
    return cells + [aa]


def accuracy_table(rows: Sequence[dict], split: str, samples: int) -> str:
    lines = [
        f"| model | seeds | clean (all images) | PGD-10 {' | PGD-10 '.join(EPS)} ({samples} images) | aa 4/255 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, group in by_model(rows).items():
        seeds = ", ".join(str(r["seed"]) for r in group) if group[0].get("cell") else "given"
        lines.append(f"| {name} | {seeds} | " + " | ".join(accuracy_cells(group, split)) + " |")
    return "\n".join(lines)


def outcomes(row: dict, split: str, measure: str) -> str:
    """Per-image outcomes of one row: ``clean`` (every image), ``pgd4`` or ``aa4`` (4/255)."""
    if measure == "clean":
        return row["clean_all"][split]["outcomes"]["clean"]
    record = row["aa"][split] if measure == "aa4" else row[split]
    attack = "aa" if measure == "aa4" else "pgd"
    (index,) = [i for i, e in enumerate(record["robust"]) if e["attack"] == attack and e["eps"] == TARGET_EPS]
    return record["outcomes"]["robust"][index]


MEASURES = {"clean": "clean", "pgd4": "PGD-10 4/255", "aa4": "aa 4/255"}


def differences(rows: Sequence[dict], baseline: str) -> dict[str, dict]:
    """model -> {split/measure: Difference} against ``baseline`` on the seeds both have (paired bootstrap); aa on
    those of them it ran on in both."""
    groups = by_model([r for r in rows if r.get("cell")])
    if baseline not in groups:
        return {}
    base = {r["seed"]: r for r in groups[baseline]}
    result = {}
    for name, group in groups.items():
        pairs = [(r, base[r["seed"]]) for r in group if r["seed"] in base]
        if name == baseline or not pairs:
            continue
        result[name] = {}
        for split in SPLITS:
            for measure in MEASURES:
                measured = [(r, b) for r, b in pairs if measure != "aa4" or ("aa" in r and "aa" in b)]
                if not measured:
                    continue
                model_outcomes = [outcomes(r, split, measure) for r, _ in measured]
                base_outcomes = [outcomes(b, split, measure) for _, b in measured]
                result[name][f"{split}/{measure}"] = paired_bootstrap(model_outcomes, base_outcomes)
    return result


def frontier_margins(rows: Sequence[dict], given: Sequence[dict], baseline: str) -> dict[str, dict]:
    """model -> {split: Difference}: each student's clean accuracy above ``baseline``'s interpolation frontier (the
    student foundation, the baseline's ``interp<alpha>`` controls, the baseline itself) at the student's own PGD-10
    4/255 robustness (:func:`mmtard.experiments.stats.frontier_margin`). Empty without the frontier's points."""
    groups = by_model(rows)
    if baseline not in groups:
        return {}
    cell = groups[baseline][0]["cell"]
    interps = sorted(
        (g for g in groups.values() if g[0].get("control") == "interpolation" and g[0]["cell"] == cell),
        key=lambda g: g[0]["alpha"],
    )
    foundation = [r for r in given if r["stage"] == "foundation-student"]
    if not interps or not foundation:
        return {}
    line = [foundation, *interps, groups[baseline]]
    margins: dict[str, dict] = {}
    for name, group in groups.items():
        if group[0].get("control") == "interpolation" or name == baseline:
            continue
        for split in SPLITS:
            points = [clean_and_pgd(g, split) for g in line]
            margins.setdefault(name, {})[split] = frontier_margin(clean_and_pgd(group, split), points)
    return margins


def no_frontier_line(rows: Sequence[dict], baseline: str) -> str:
    """Said in place of the frontier section when ``baseline`` has no interpolation controls on disk, so a reader
    does not take the section's absence for a finding (the baseline can change with one more seed)."""
    cell = by_model(rows)[baseline][0]["cell"]
    return (
        f"No interpolation frontier of `{baseline}`: its `interp<alpha>` controls are not on disk (the student "
        f"foundation's row is needed as well). Run again with `--frontier {cell}` to add them."
    )


def clean_and_pgd(group: Sequence[dict], split: str) -> tuple[list[str], list[str]]:
    """A model's per-image outcomes on ``split``, one string per seed: clean (every image) and PGD-10 4/255."""
    return [outcomes(r, split, "clean") for r in group], [outcomes(r, split, "pgd4") for r in group]


def frontier_table(margins: dict[str, dict], baseline: str) -> str:
    lines = [
        f"| model | seeds | seen: clean above `{baseline}`'s frontier | unseen: clean above the frontier |",
        "|---|---|---|---|",
    ]
    for name, by_split in margins.items():
        lines.append(f"| {name} | {by_split['seen'].seeds} | {by_split['seen'].text()} | {by_split['unseen'].text()} |")
    return "\n".join(lines)


def differences_table(diffs: dict[str, dict], baseline: str) -> str:
    keys = [f"{split}/{m}" for split in SPLITS for m in MEASURES]
    header = " | ".join(f"{k.split('/')[0]} {MEASURES[k.split('/')[1]]}" for k in keys)
    lines = [f"| model − {baseline} | seeds | {header} |", "|---|---|" + "---|" * len(keys)]
    for name, cells in diffs.items():
        seeds = max(d.seeds for d in cells.values())
        texts = [
            "-"
            if k not in cells
            else cells[k].text() + ("" if cells[k].seeds == seeds else f" ({cells[k].seeds} of them)")
            for k in keys
        ]
        lines.append(f"| {name} | {seeds} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def efficiency(out: Path, rows: Sequence[dict], baseline: str) -> tuple[str, dict[str, list]]:
    """Steps (and training seconds) each student with held-out curves needs to reach ``baseline``'s final
    held-out PGD-10 4/255 accuracy (same seed); per model, the steps on each seed (None: never reached)."""
    lines = ["| student | seed | s / step | final held-out PGD-10 4/255 | steps to reach the baseline's final |"]
    lines.append("|---|---|---|---|---|")
    curves: dict[int, dict[str, dict]] = {}
    for row in rows:
        run = RunDir(out / row["stage"])
        if not row.get("cell") or not run.eval_log.is_file():
            continue
        seconds = [row["batch_size"] / m["samples_per_s"] for m in run.read_metrics()]
        curve = [(e["step"], robust_accuracy(e, "pgd", TARGET_EPS)) for e in run.read_eval_log()]
        curves.setdefault(row["seed"], {})[model_name(row)] = {"seconds": seconds, "curve": curve}
    reached_by_model: dict[str, list] = {}
    for seed, models in sorted(curves.items()):
        if baseline not in models:
            continue
        target = models[baseline]["curve"][-1][1]
        for name, data in models.items():
            reached = next((step for step, acc in data["curve"] if acc >= target), None)
            reached_by_model.setdefault(name, []).append(reached)
            lines.append(
                f"| {name} | {seed} | {statistics.median(data['seconds']):.2f} | {data['curve'][-1][1]:.1f} | "
                f"{reached or 'not reached'} |"
            )
    return "\n".join(lines), reached_by_model


def checks_summary(rows: Sequence[dict]) -> str:
    """One line: the gradient-masking checks of every record, or each warning with its model."""
    records = [(r["stage"], s, rec) for r in rows for s in SPLITS for rec in (r[s], r.get("aa", {}).get(s)) if rec]
    warnings = [f"{stage} ({split}): {w}" for stage, split, rec in records for w in rec["checks"].get("warnings", [])]
    if not warnings:
        return (
            f"Gradient-masking checks (robust <= clean, monotonic in eps, aa not weaker than PGD-10 on the same "
            f"images, zero-gradient share): all passed for the {len(records)} records above."
        )
    return "Gradient-masking check warnings:\n\n" + "\n".join(f"- {w}" for w in warnings)


def headline_records(
    rows: Sequence[dict], diffs: dict[str, dict], steps_to_baseline: dict[str, list], baseline: str
) -> list[dict]:
    """``zoo-headline.json``: one record per (cell, split) of the students and per (control, split), accuracies in
    percent; a control is marked by ``control`` (``interpolation`` with its ``alpha``, or ``self-anchor``)."""
    records = []
    for name, group in by_model([r for r in rows if r.get("cell")]).items():
        control = group[0].get("control") or CELLS[group[0]["cell"]].control
        for split in SPLITS:
            clean = [r["clean_all"][split]["clean_acc"] for r in group]
            aa = [robust_accuracy(r["aa"][split], "aa", TARGET_EPS) for r in group if "aa" in r]
            record = {
                "cell": group[0]["cell"],
                "preset": group[0]["preset"],
                "recipe": group[0]["recipe"],
                "model": name,
                "split": split,
                "seeds": [r["seed"] for r in group],
                "clean_mean": round(statistics.mean(clean), 2),
                "clean_std": round(statistics.stdev(clean), 2) if len(clean) > 1 else 0.0,
                "clean_samples": group[0]["clean_all"][split]["samples"],
                "aa4_mean": round(statistics.mean(aa), 2) if aa else None,
                "aa4_std": (round(statistics.stdev(aa), 2) if len(aa) > 1 else 0.0) if aa else None,
                "aa4_seeds": [r["seed"] for r in group if "aa" in r],
                "robust_samples": group[0][split]["samples"],
                "steps_to_baseline_final": steps_to_baseline.get(name),
                "baseline": baseline,
            }
            if control:
                record["control"] = control
            if control == "interpolation":
                record["alpha"] = group[0]["alpha"]
            for eps in EPS:
                values = [robust_accuracy(r[split], "pgd", eps) for r in group]
                record[f"pgd{eps.split('/')[0]}_mean"] = None if None in values else round(statistics.mean(values), 2)
            record["vs_baseline"] = {
                key.split("/")[1]: d.to_dict() for key, d in diffs.get(name, {}).items() if key.startswith(split)
            }
            records.append(record)
    return records


def calibration_table(rows: Sequence[dict]) -> str:
    """Per recipe and preset: the calibration targets beside the result (mean over seeds)."""
    lines = [
        "| recipe | preset | seeds | seen clean | seen PGD-10 4/255 | unseen clean | target | met | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group in by_model([r for r in rows if r.get("cell")]).values():
        preset = group[0]["preset"]
        unseen = statistics.mean(r["clean_all"]["unseen"]["clean_acc"] for r in group)
        pgd = statistics.mean(robust_accuracy(r["seen"], "pgd", TARGET_EPS) for r in group)
        clean_max, pgd_min = CALIBRATION_TARGETS.get(preset, (None, None))
        target = f"unseen clean ≤ {clean_max:g}, PGD ≥ {pgd_min:g}" if clean_max else "-"
        met = "yes" if clean_max and unseen <= clean_max and pgd >= pgd_min else ("no" if clean_max else "-")
        seconds = [r["train_seconds"] for r in group if r.get("train_seconds")]
        seen = mean_std([r["clean_all"]["seen"]["clean_acc"] for r in group])
        train = f"{statistics.mean(seconds):.0f}" if seconds else "-"
        lines.append(
            f"| {group[0]['recipe']} | {preset} | {len(group)} | {seen} | {pgd:.1f} | {unseen:.1f} | {target} | "
            f"{met} | {train} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the run


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out, started = Path(args.out), time.perf_counter()
    scale = replace(
        ZOO_SCALE,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        eval_samples=args.eval_samples,
        eval_every=args.eval_every,
        **DISTILL_IMAGES[args.distill_images],
    )
    seeds = args.seeds
    if args.calibrate:
        jobs = make_jobs(CALIBRATION, args.calibrate, seeds)
    else:
        jobs = make_jobs(args.cells, [args.recipe], seeds)
        jobs += [j for j in make_jobs(args.ablation, [args.recipe], seeds[:1]) if j not in jobs]
    aa = not (args.no_aa or args.calibrate)
    command = f"python benchmarks/zoo_benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    # Any extra teacher a cell adds, trained once before the students that share it (nothing is evaluated here).
    more = {j.variant_name: j.cell.variant(j.recipe) for j in jobs if j.cell.more_teachers}
    if more and not args.report_only:
        run_protocol(out, scale, (), (), more, zoo=args.zoo, progress=False, rows_for=())
    # The zoo's models are evaluated after the students (the teachers cost the most), not for the calibration.
    given = [] if args.calibrate or args.no_zoo_models else args.zoo_models
    # The controls: each finished student of a --frontier cell, interpolated with the student foundation.
    frontier = (
        [] if args.calibrate else [Frontier(j, a) for j in jobs if j.cell.name in args.frontier for a in args.alphas]
    )
    check = None if args.calibrate else protocol_check(out, scale, args)

    def report(*_):
        rows = [row for task in [*jobs, *frontier] if (row := finished(out, task)) is not None]
        given_rows = [row for stage in given if (row := finished(out, stage)) is not None]
        write_report(out, args, command, scale, given_rows, rows, jobs, started, check)

    tasks = [*jobs, *given, *(f for f in frontier if finished(out, f.job) is not None)]
    failures = [] if args.report_only else run_tasks(out, scale, args.zoo, tasks, args.jobs, aa, report)
    report()
    if failures:
        print("Failed: " + "; ".join(failures), flush=True)


def protocol_check(out: Path, scale: ProtocolScale, args: argparse.Namespace) -> list[dict]:
    """The protocol check's records (:func:`mmtard.experiments.protocol_check.measure_teachers`), measured once on
    the zoo's models and kept in ``<out>/protocol-check.json``."""
    path = out / "protocol-check.json"
    if path.is_file():
        return json.loads(path.read_text())
    records = measure_teachers(scale, given_models(args.zoo), samples=PROTOCOL_CHECK_SAMPLES)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1))
    return records


def check_section(scale: ProtocolScale, args, check: list[dict], given: Sequence[dict], rows: Sequence[dict]) -> str:
    """The protocol check's table and its preconditions for this run's distillation images."""
    from mmtard.data import create_dataset

    labels = create_dataset(scale.dataset, scale.data_dir, split="test", image_size=32).labels  # P0: the parts
    found = preconditions(scale, args.distill_images, check, given, rows, test_labels=labels)
    return (
        f"## Protocol check (distillation images: {args.distill_images})\n\n"
        f"Every zoo model on {PROTOCOL_CHECK_SAMPLES} class-balanced seen-class images of each set, logit scale 100, "
        "the method's temperature 1: `distill` are the images the students distil on, `held-out` the seen-class "
        "images they are evaluated on, for both ways of choosing them.\n\n"
        + check_table(check)
        + "\n\nPreconditions of this run:\n\n"
        + "\n".join(p.line() for p in found)
    )


def stronger_baseline(rows: Sequence[dict], recipe: str) -> str:
    """Of ``ard`` and ``ard_rslad`` (the authors' single-teacher script), the model with the higher mean robust
    accuracy at 4/255 over both splits: aa where every seed of both has it, else PGD-10."""
    groups = by_model([r for r in rows if r.get("cell") and not r.get("control")])
    names = [n for n in (f"student-ard-{recipe}", f"student-ard_rslad-{recipe}") if n in groups]
    if not names:
        return f"student-ard-{recipe}"
    attack = "aa" if all("aa" in r for n in names for r in groups[n]) else "pgd"

    def robust(name: str) -> float:
        records = [r["aa"] if attack == "aa" else r for r in groups[name]]
        return statistics.mean(robust_accuracy(rec[s], attack, TARGET_EPS) for rec in records for s in SPLITS)

    return max(names, key=robust)


def write_report(out, args, command, scale, given, rows, jobs, started, check=None) -> None:
    for row in rows:
        row.setdefault("batch_size", args.batch_size)
    missing = [job.stage for job in jobs if job.stage not in {r["stage"] for r in rows}]
    header = [
        f"Command: `{command}`",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores). Students: batch "
        f"{args.batch_size}, PGD at 4/255 inside training, the recipe in each model's name "
        f"({', '.join(f'{r.name}: {r.steps} steps at lr {r.lr:g}, PGD-{r.attack_steps}' for r in RECIPES.values())}). "
        f"Distillation images: {args.distill_images} ({distill_text(scale)}). Clean accuracy on every evaluated "
        f"image of the split; PGD-10 (1 restart) and aa on the same {args.eval_samples} class-balanced images per "
        "split for every model.",
    ]
    sections = list(header)
    if check is not None:
        sections.append(check_section(scale, args, check, given, rows))
    if args.calibrate:
        sections.append("## Calibration (issue 16's targets)\n\n" + calibration_table(rows))
    for split in SPLITS:
        title = "Seen classes (in-distribution)" if split == "seen" else "Unseen classes (zero-shot)"
        sections.append(f"## {title}\n\n" + accuracy_table([*given, *rows], split, args.eval_samples))
    baseline = f"student-ard-{args.recipe}" if args.calibrate else stronger_baseline(rows, args.recipe)
    diffs = {} if args.calibrate else differences(rows, baseline)
    if diffs:
        sections.append(
            f"## Differences against `{baseline}` in points, 95% paired bootstrap interval over images and seeds\n\n"
            "The baseline is the stronger of `ard` and `ard_rslad` (higher mean robust accuracy at 4/255 over both "
            "splits). `interp<alpha>` rows are the controls: the student interpolated with the student foundation.\n\n"
            + differences_table(diffs, baseline)
        )
    margins = {} if args.calibrate else frontier_margins(rows, given, baseline)
    if margins:
        sections.append(
            f"## Above the interpolation frontier of `{baseline}`, in points of clean accuracy at the model's own "
            "PGD-10 4/255 robustness\n\n"
            "The frontier joins the student foundation, the baseline interpolated with it (its `interp<alpha>` rows) "
            "and the baseline, each averaged over its seeds; 95% bootstrap interval over images and each model's "
            "seeds. Positive: more clean accuracy than the free trade-off gives at that robustness.\n\n"
            + frontier_table(margins, baseline)
        )
    elif diffs:
        sections.append(no_frontier_line(rows, baseline))
    if not args.calibrate:
        sections += against_sections(rows, given, [f"student-{cell}-{args.recipe}" for cell in args.against])
    eff_table, steps_to_baseline = efficiency(out, rows, baseline)
    if not args.calibrate:
        sections.append("## Training efficiency (held-out PGD-10 4/255 on 100 images)\n\n" + eff_table)
    sections.append(checks_summary(rows))
    if missing:
        sections.append("Not in these tables yet (running, failed or not run): " + ", ".join(missing) + ".")
    sections.append(f"Whole run (this invocation, so far): {time.perf_counter() - started:.0f} s.")
    text = "\n\n".join(sections) + "\n"
    atomic_write_text(out / ("calibration.md" if args.calibrate else "benchmark.md"), text)
    atomic_write_text(out / ("calibration.json" if args.calibrate else "benchmark.json"), json.dumps(rows, indent=1))
    print(text, flush=True)
    if args.calibrate or not rows:
        return
    headline = headline_records(rows, diffs, steps_to_baseline, baseline)
    atomic_write_text(out / "zoo-headline.json", json.dumps(headline, indent=2))
    first_seed = [r for r in rows if r["seed"] == args.seeds[0] and not r.get("control")]
    plot_lambda_trajectories(out, first_seed, out / "lambda_r.png")
    # PGD-10 for every model (the zoo's own four included); aa for the models it was run on. The frontiers: each
    # interpolated cell's points from the student foundation (alpha 0) to the student itself (alpha 1).
    lines = frontier_lines(rows, args.recipe)
    plot_pareto([*given, *rows], out / "pareto_pgd.png", attack="pgd", eps=TARGET_EPS, lines=lines)
    aa_rows = [dict(r, seen=r["aa"]["seen"], unseen=r["aa"]["unseen"]) for r in rows if "aa" in r]
    if aa_rows:
        plot_pareto(aa_rows, out / "pareto.png", attack="aa", eps=TARGET_EPS, lines=lines)
    write_per_image(out / "per-image.json.gz", [*given, *rows], describe=f"{command}; {distill_text(scale)}")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(docs / "zoo-headline.json", json.dumps(headline, indent=2))
        if check is not None:
            atomic_write_text(docs / "protocol-check.json", json.dumps(check, indent=1))
        for name in ("pareto.png", "pareto_pgd.png", "lambda_r.png", "per-image.json.gz"):
            if (out / name).is_file():
                (docs / name).write_bytes((out / name).read_bytes())


def against_sections(rows: Sequence[dict], given: Sequence[dict], baselines: Sequence[str]) -> list[str]:
    """``--against``: the differences and frontier margins against each of ``baselines`` that has students (the
    interpolation controls of other cells left out: they are points of other baselines' frontiers)."""
    sections = []
    for baseline in baselines:
        cell = next((r["cell"] for r in rows if r["stage"].startswith(baseline + "-seed")), None)
        compared = [r for r in rows if r.get("control") != "interpolation" or r["cell"] == cell]
        diffs = differences(compared, baseline)
        if diffs:
            sections.append(
                f"## Differences against `{baseline}` (`--against`), in points, 95% paired bootstrap interval\n\n"
                + differences_table(diffs, baseline)
            )
        margins = frontier_margins(compared, given, baseline)
        if margins:
            sections.append(
                f"## Above the interpolation frontier of `{baseline}` (`--against`), clean accuracy at the model's "
                "own PGD-10 4/255 robustness\n\n" + frontier_table(margins, baseline)
            )
    return sections


def distill_text(scale: ProtocolScale) -> str:
    """Where the students distil and which seen-class images are evaluated, in words."""
    part = f", part {scale.student_part}" if scale.student_part else ""
    held_out = f"part {scale.seen_eval_part} of 'test'" if scale.seen_eval_part else "all of 'test'"
    return f"split '{scale.student_split}'{part} of the seen classes; seen classes evaluated on {held_out}"


def frontier_lines(rows: Sequence[dict], recipe: str) -> list[list[str]]:
    """Per interpolated cell, the model names from the student foundation to the student, by alpha."""
    controls = [r for r in rows if r.get("control") == "interpolation"]
    lines = []
    for cell in dict.fromkeys(r["cell"] for r in controls):
        alphas = sorted({r["alpha"] for r in controls if r["cell"] == cell})
        lines.append(
            ["foundation-student", *(f"interp{a:g}-{cell}-{recipe}" for a in alphas), f"student-{cell}-{recipe}"]
        )
    return lines


if __name__ == "__main__":
    main()
