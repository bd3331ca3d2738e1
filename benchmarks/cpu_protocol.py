"""The zoo benchmark of MMT-ARD against its baselines (spec section 5), on ../shared/data/cifar10.

Run by hand, not in CI (about three and a half hours on 2 idle cores at the default scale; a GPU machine runs
every cell on every seed with ``--jobs 16 --cells all``, see ``benchmarks/gpu_run.sh``):

    python ../shared/zoo/rebuild.py --out runs/zoo
    python benchmarks/cpu_protocol.py --zoo runs/zoo --out runs/bench-zoo --jobs 2

The foundations and teachers are the zoo's GPU-trained tiny CLIPs (tiny-vit-s student foundation, tiny-vit-l
teachers), evaluated here and never trained. Phases, each reusing what an earlier run already produced (stop and
rerun at will):

1. Baseline students on the seen classes, every seed, 200 steps of batch 64 each (PGD-2 at 4/255 inside
   training): ``ard``, ``tecoa``, ``reference``. Every model, the given ones too, is evaluated clean and with
   PGD-10 at 1/255, 2/255, 4/255 on seen and unseen test images.
2. Ablation (first seed): the spec's first defaults (``mmt-ard_v1``), a robust prior or the accuracy-gap balance
   with ARD's inner objective, RSLAD's target (``P_R(x)``) alone and beside a light clean term, the clean teacher
   distilled into the adversarial output (``clean_input: adversarial``) or into both outputs, and two robust
   teachers (the zoo's TeCoA teacher and a FARE teacher trained here). The candidates (``CANDIDATES``, or
   ``--cells``) are then trained for every seed.
3. ``mmt-ard`` with the preset's defaults, every seed: the rows of the ablation cell whose settings equal the
   preset's (``mmt-ard_cleanadv`` since issue 8), or trained here when no cell does.
4. ``aa`` (APGD-CE + APGD-T, 100 iterations each) at 4/255 beside PGD-10 on the same images, for the student
   foundation, the headline students and the candidates (every seed; each student is attacked in its own job,
   right after training); the gradient-masking checks compare the two attacks on the same images.
5. Efficiency: steps and training seconds each distillation student needs to reach ``ard``'s final held-out
   robust accuracy (PGD-10 at 4/255, 100 held-out images every 20 steps), per seed.

Writes ``<out>/benchmark.md`` and ``<out>/benchmark.json`` after every phase, the plots, and with ``--docs DIR``
the headline as data (``DIR/zoo-headline.json``) beside the Pareto plot (``DIR/pareto.png``) and the lambda_R
trajectories (``DIR/lambda_r.png``).
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
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtard.attacks.checks import check_robust_results  # noqa: E402
from mmtard.experiments import ZOO_SCALE, ProtocolScale, run_protocol  # noqa: E402
from mmtard.experiments.protocol import (  # noqa: E402
    GIVEN_STAGES,
    evaluate_stage,
    has_teachers,
    protocol_stages,
    stage_row,
)
from mmtard.experiments.report import (  # noqa: E402
    group_by_model,
    mean_std,
    plot_lambda_trajectories,
    plot_pareto,
    plot_robust_vs_eps,
    plot_training_curves,
    results_table,
    robust_accuracy,
)
from mmtard.fileio import atomic_write_text  # noqa: E402
from mmtard.methods import method_config  # noqa: E402
from mmtard.train import RunDir  # noqa: E402

# The spec's first defaults, written out so the name keeps its meaning when the preset changes.
SPEC_V1 = {
    "method": "mmt-ard",
    "inner": "kl-clean-teacher",
    "diw": "cosine",
    "balance": "sigmoid",
    "beta": 5.0,
    "rho": 1.0,
    "robust_target": "adversarial",
    "clean_input": "clean",
}
RSLAD = {"robust_target": "clean", "inner": "kl-robust-teacher"}  # RSLAD's target and ARD's inner objective
ARD_INNER = {"inner": "kl-robust-teacher"}  # ARD's adversarial examples, the robust term on P_R(x') as ARD
ABLATION = {
    "mmt-ard_v1": SPEC_V1,
    # A robust prior or the accuracy-gap rule, with ARD's adversarial examples.
    "mmt-ard_rho9_ardinner": {**SPEC_V1, "rho": 9.0, **ARD_INNER},
    "mmt-ard_gap_ardinner": {**SPEC_V1, "balance": "gap", **ARD_INNER},
    # RSLAD's target for the robust term: alone (single-teacher), and with a full-strength robust term (ARD's
    # weight 1) beside a light clean term (AdamW is invariant to the loss scale: the ratio lambda_C / lambda_R counts).
    "ard_rslad": {"method": "ard", "robust_target": "clean"},
    "mmt-ard_fixed_rslad": {**SPEC_V1, "balance": "fixed", "lambda_robust": 1.0, "lambda_clean": 0.25, **RSLAD},
    # The clean teacher's P_C(x) distilled into the student's adversarial output P_S(x') (clean_input), or into both.
    "mmt-ard_cleanadv": {**SPEC_V1, "clean_input": "adversarial"},
    "mmt-ard_cleanadv_fixed": {**SPEC_V1, "clean_input": "adversarial", "balance": "fixed", **ARD_INNER},
    "mmt-ard_cleanboth": {**SPEC_V1, "clean_input": "both"},
    # Two robust teachers (issue 12): the zoo's TeCoA teacher and a FARE teacher trained here from the teacher
    # foundation (stage teacher-fare, ProtocolScale.teacher_steps of the benchmark's batch).
    "mmt-ard_cleanadv_fare": {**SPEC_V1, "clean_input": "adversarial", "more_teachers": {"fare": "robust"}},
}
# The ablation's best cells, trained for every seed (chosen from the first-seed ablation; see BENCHMARKS.md).
# ``--cells all`` trains every cell on every seed instead (a GPU runs the whole grid in minutes).
CANDIDATES = ("mmt-ard_cleanadv", "mmt-ard_v1", "mmt-ard_rho9_ardinner", "mmt-ard_gap_ardinner")
BASELINES = ("ard", "tecoa", "reference")
TARGET_EPS = "4/255"
# Given models also attacked with aa (the teachers are larger and cost minutes each; PGD-10 rows show them).
AA_GIVEN = ("foundation-student",)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="runs/zoo", help="the rebuilt zoo (python ../shared/zoo/rebuild.py --out DIR)")
    p.add_argument("--out", default="runs/bench-zoo")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=ZOO_SCALE.batch_size)
    p.add_argument("--student-steps", type=int, default=ZOO_SCALE.student_steps)
    p.add_argument("--train-attack-steps", type=int, default=ZOO_SCALE.train_attack_steps)
    p.add_argument("--eval-samples", type=int, default=200, help="test images per split for clean / PGD-10")
    p.add_argument("--aa-samples", type=int, default=200, help="test images per split for aa at 4/255")
    p.add_argument("--eval-every", type=int, default=ZOO_SCALE.eval_every, help="held-out PGD period in training")
    p.add_argument("--jobs", type=int, default=1, help="students trained (and evaluated) at once, one thread each")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), help="baseline presets trained on every seed")
    p.add_argument(
        "--cells",
        nargs="+",
        default=list(CANDIDATES),
        help="ablation cells trained on every seed and attacked with aa (default: CANDIDATES; 'all': every cell)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["ablation", "candidates", "aa"], help="phases to skip")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and attack nothing: tables of the students and aa results already on disk, the rest listed",
    )
    p.add_argument("--docs", default=None, help="also write zoo-headline.json, pareto.png, lambda_r.png here")
    return p.parse_args(argv)


def student_jobs(methods: Sequence[str], variants: Mapping[str, Mapping], seeds: Sequence[int]) -> list[tuple]:
    """One ``(methods, variants, seed)`` job per student, for :func:`train_students`."""
    jobs = [((name,), {}, seed) for name in methods for seed in seeds]
    return jobs + [((), {name: spec}, seed) for name, spec in variants.items() for seed in seeds]


def _run_student(
    out: str, scale: ProtocolScale, zoo: str, job: tuple, threads: int | None, aa_samples: int | None = None
) -> list[dict]:
    """Train and evaluate one student; with ``aa_samples``, attack it with aa too (cached for the aa phase)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    methods, variants, seed = job
    rows = run_protocol(out, scale, methods, (seed,), variants, progress=False, zoo=zoo)
    rows = [row for row in rows if row["stage"] == job_stage(job)]  # not the given or extra teachers' rows
    for row in rows if aa_samples else ():
        evaluate_with_aa(scale, row, Path(out), aa_samples, Path(zoo))
    return rows


def row_on_disk(out: Path, scale: ProtocolScale, job: tuple) -> dict:
    """The row of a finished job from its cached evaluation, without its model file (``--report-only``)."""
    methods, variants, seed = job
    ((role, stage),) = [
        (r, s) for r, s in protocol_stages(scale, methods, (seed,), variants) if s.name == job_stage(job)
    ]
    return stage_row(scale, role, stage, RunDir(out / stage.name).model, out, False)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started fresh (``spawn``): a forked child cannot use CUDA once the parent has."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def job_cell(job: tuple) -> str:
    """The method or ablation cell a :func:`student_jobs` job trains."""
    methods, variants, _ = job
    return (list(methods) + list(variants))[0]


def job_stage(job: tuple) -> str:
    """The stage name of a :func:`student_jobs` job."""
    return f"student-{job_cell(job)}-seed{job[2]}"


def finished(out: Path, job: tuple) -> bool:
    """Whether the job's student is trained and evaluated (its PGD-10 results are on disk; the model file too,
    unless ``--report-only`` reads results brought back without their weights, e.g. from a GPU machine)."""
    evaluated = any((out / job_stage(job)).glob("protocol_eval_pgd_*.json"))
    return evaluated and (REPORT_ONLY or RunDir(out / job_stage(job)).model.is_file())


def aa_cached(out: Path, row: dict, samples: int) -> bool:
    """Whether ``row``'s aa result at 4/255 on ``samples`` images per split is on disk."""
    return (out / row["stage"] / f"protocol_eval_aa_{samples}_eps4.0.json").is_file()


NOT_RUN: list[str] = []
REPORT_ONLY = False  # --report-only: what the tables leave out


def train_students(
    out: Path,
    scale: ProtocolScale,
    zoo: str,
    jobs: list[tuple],
    workers: int,
    aa_samples: int | None = None,
    aa_stages: Collection[str] = (),
) -> list[dict]:
    """Train and evaluate one student per job (reusing finished ones), ``workers`` at a time; rows in job order.

    With ``aa_samples``, the students named in ``aa_stages`` are also attacked with aa as soon as they are
    trained (the aa phase then finds the results on disk). With ``REPORT_ONLY``
    set, finished jobs are read from disk and unfinished ones are listed in ``NOT_RUN``.
    """
    if REPORT_ONLY:
        NOT_RUN.extend(job_stage(job) for job in jobs if not finished(out, job))
        return [row_on_disk(out, scale, job) for job in jobs if finished(out, job)]
    aa_of = {job_stage(job): aa_samples if job_stage(job) in aa_stages else None for job in jobs}
    if workers <= 1:
        return [row for job in jobs for row in _run_student(str(out), scale, zoo, job, None, aa_of[job_stage(job)])]
    with process_pool(workers) as pool:
        futures = [pool.submit(_run_student, str(out), scale, zoo, job, 1, aa_of[job_stage(job)]) for job in jobs]
        rows = []
        for job, future in zip(jobs, futures):
            try:
                rows += future.result()
            except Exception as error:  # one student's failure leaves the others' results in the tables
                logging.exception("%s failed", job_stage(job))
                NOT_RUN.append(f"{job_stage(job)} (failed: {type(error).__name__}: {error})")
        return rows


def evaluate_with_aa(scale: ProtocolScale, row: dict, out: Path, samples: int, zoo: Path) -> dict:
    """``aa`` and PGD-10 at 4/255 on the same ``samples`` images per split, checks compared across the attacks."""
    model_file = Path(zoo) / row["stage"] / "model.safetensors" if row["stage"] in GIVEN_STAGES else None
    model_file = model_file or RunDir(out / row["stage"]).model
    aa_scale = replace(scale, eval_samples=samples, eval_steps=None, eval_eps=(4 / 255,))
    parts = [
        evaluate_stage(replace(aa_scale, eval_attacks=(attack,)), row["arch"], model_file, out / row["stage"], False)
        for attack in ("pgd", "aa")
    ]
    merged = {}
    for split in ("seen", "unseen"):
        records = [part[split] for part in parts]
        if len({r["clean_acc"] for r in records}) != 1:
            raise RuntimeError(f"{row['stage']} {split}: clean accuracy differs between attacks, so the images differ")
        robust = [entry for r in records for entry in r["robust"]]
        zero = [z for r in records if (z := r["checks"]["zero_gradient_fraction"]) is not None]
        checks = check_robust_results(records[0]["clean_acc"], robust, max(zero) if zero else None)
        seconds = round(sum(r["seconds"] for r in records), 2)
        merged[split] = dict(records[0], robust=robust, eps_values=[TARGET_EPS], seconds=seconds, checks=checks)
    return dict(row, **merged)


def _aa_job(out: str, scale: ProtocolScale, row: dict, samples: int, zoo: str) -> dict:
    import torch

    torch.set_num_threads(1)
    return evaluate_with_aa(scale, row, Path(out), samples, Path(zoo))


def evaluate_all_with_aa(out: Path, scale: ProtocolScale, rows: list[dict], samples: int, zoo: str, workers: int):
    """:func:`evaluate_with_aa` for every row, given models first (their caches are shared by nobody else)."""
    if workers <= 1:
        return [evaluate_with_aa(scale, row, out, samples, Path(zoo)) for row in rows]
    with process_pool(workers) as pool:
        futures = [pool.submit(_aa_job, str(out), scale, row, samples, zoo) for row in rows]
        return [future.result() for future in futures]


def efficiency(out: Path, rows: list[dict], target_eps: str = TARGET_EPS) -> tuple[str, dict[str, list]]:
    """Steps (and training seconds) to reach ``ard``'s final held-out robust accuracy of the same seed.

    Returns the table and, per model name, the steps needed on each seed (None where never reached).
    """
    lines = [
        "| student | seed | s / step | final held-out PGD-10 4/255 | steps to reach ard's final "
        "| seconds to reach it |",
        "|---|---|---|---|---|---|",
    ]
    curves: dict[int, dict[str, dict]] = {}
    for row in rows:
        run = RunDir(out / row["stage"])
        if not has_teachers(row["method"]) or not run.eval_log.is_file():
            continue
        metrics = run.read_metrics()
        seconds = [row.get("batch_size", ZOO_SCALE.batch_size) / m["samples_per_s"] for m in metrics]
        curve = [(e["step"], robust_accuracy(e, "pgd", target_eps)) for e in run.read_eval_log()]
        name = row["stage"].rsplit("-seed", 1)[0]
        curves.setdefault(row["seed"], {})[name] = {"seconds": seconds, "curve": curve}
    reached_by_model: dict[str, list] = {}
    for seed, models in sorted(curves.items()):
        if "student-ard" not in models:
            continue
        target = models["student-ard"]["curve"][-1][1]
        for name, data in models.items():
            reached = next((step for step, acc in data["curve"] if acc >= target), None)
            reached_by_model.setdefault(name, []).append(reached)
            wall = f"{sum(data['seconds'][:reached]):.0f}" if reached else "-"
            lines.append(
                f"| {name} | {seed} | {statistics.median(data['seconds']):.2f} | {data['curve'][-1][1]:.1f} | "
                f"{reached or 'not reached'} | {wall} |"
            )
    return "\n".join(lines), reached_by_model


def pgd_table(rows: list[dict], split: str) -> str:
    """Clean and PGD-10 at every radius, mean ± std over seeds, one line per model."""
    eps_list = ("1/255", "2/255", "4/255")
    lines = ["| model | seeds | clean | " + " | ".join(f"PGD-10 {e}" for e in eps_list) + " |"]
    lines.append("|---|---|---|" + "---|" * len(eps_list))
    for name, group in group_by_model(rows).items():
        cells = [mean_std([g[split]["clean_acc"] for g in group])]
        cells += [mean_std([robust_accuracy(g[split], "pgd", e) for g in group]) for e in eps_list]
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_records(pgd_rows: list[dict], aa_rows: list[dict], steps_to_ard: dict[str, list]) -> list[dict]:
    """``zoo-headline.json``: one record per headline student and split (accuracies in percent)."""
    records = []
    aa_groups = group_by_model(aa_rows)
    for name, group in group_by_model(pgd_rows).items():
        method = group[0]["method"] if group[0]["role"] not in ("foundation", "teacher") else group[0]["stage"]
        aa_group = aa_groups.get(name, [])
        for split in ("seen", "unseen"):
            aa = [robust_accuracy(g[split], "aa", TARGET_EPS) for g in aa_group]
            clean = [g[split]["clean_acc"] for g in group]
            pgd4 = [robust_accuracy(g[split], "pgd", TARGET_EPS) for g in group]
            records.append(
                {
                    "method": method,
                    "model": name,
                    "seeds": sorted(g["seed"] for g in group),
                    "split": split,
                    "clean_mean": round(statistics.mean(clean), 2),
                    "clean_std": round(statistics.stdev(clean), 2) if len(clean) > 1 else 0.0,
                    "aa4_mean": round(statistics.mean(aa), 2) if aa else None,
                    "aa4_std": round(statistics.stdev(aa), 2) if len(aa) > 1 else (0.0 if aa else None),
                    "aa4_samples": aa_group[0][split]["samples"] if aa_group else None,
                    "aa4_seeds": sorted(g["seed"] for g in aa_group),
                    "pgd4_mean": round(statistics.mean(pgd4), 2),
                    "steps_to_ard_final": steps_to_ard.get(name),
                }
            )
    return records


def checks_summary(rows: list[dict]) -> str:
    """One line: the gradient-masking checks of every record, or each warning with its model."""
    warnings = [
        f"{row['stage']} ({split}): {w}"
        for row in rows
        for split in ("seen", "unseen")
        for w in row[split]["checks"]["warnings"]
    ]
    if not warnings:
        return (
            f"Gradient-masking checks (robust <= clean, monotonic in eps, a stronger attack not weaker on the same "
            f"images, zero-gradient share): all passed for the {len(rows)} records above."
        )
    return "Gradient-masking check warnings:\n\n" + "\n".join(f"- {w}" for w in warnings)


def write_report(out: Path, sections: list[str], rows: list[dict], started: float) -> None:
    """Write what is done so far: a later phase that is stopped leaves the earlier tables in place."""
    took = f"Whole run (this invocation, so far): {time.perf_counter() - started:.0f} s."
    text = "\n\n".join([*sections, took]) + "\n"
    atomic_write_text(out / "benchmark.md", text)
    atomic_write_text(out / "benchmark.json", json.dumps(rows, indent=2))
    print(text, flush=True)


def default_cell(name: str = "mmt-ard") -> str | None:
    """The ablation cell whose settings equal preset ``name``'s defaults (it then stands for the preset), or None."""
    preset = method_config(name)
    for cell, spec in ABLATION.items():
        overrides = {k: v for k, v in spec.items() if k != "method"}
        if "more_teachers" in spec:  # the preset has the two standard teachers
            continue
        if spec["method"] == name and method_config(name, **overrides) == preset:
            return cell
    return None


def main(argv: Sequence[str] | None = None) -> None:
    global REPORT_ONLY
    args = parse_args(argv)
    REPORT_ONLY = args.report_only
    logging.basicConfig(level=logging.WARNING)
    out, started = Path(args.out), time.perf_counter()
    scale = replace(
        ZOO_SCALE,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        student_steps=args.student_steps,
        train_attack_steps=args.train_attack_steps,
        eval_samples=args.eval_samples,
        eval_every=args.eval_every,
    )
    cells = list(ABLATION) if args.cells == ["all"] else args.cells
    unknown = sorted(set(cells) - set(ABLATION))
    if unknown:
        raise SystemExit(f"--cells: unknown {unknown}; expected 'all' or names from {list(ABLATION)}")
    # Checks the zoo and evaluates it; trains the extra teachers some cells add (before the students, which share them).
    more_teachers = {name: spec for name, spec in ABLATION.items() if "more_teachers" in spec}
    given = run_protocol(out, scale, methods=(), seeds=(), variants=more_teachers, zoo=args.zoo, progress=False)
    phases = {"baselines": student_jobs(args.baselines, {}, args.seeds), "ablation": [], "default": []}
    if "ablation" not in args.skip:
        phases["ablation"] = student_jobs((), ABLATION, args.seeds[:1])
        if "candidates" not in args.skip:
            phases["ablation"] += student_jobs((), {name: ABLATION[name] for name in cells}, args.seeds[1:])
    cell = default_cell()
    default_jobs = [job for job in phases["ablation"] if job_cell(job) == cell]
    if {job[2] for job in default_jobs} != set(args.seeds) and not (REPORT_ONLY and default_jobs):
        phases["default"] = default_jobs = student_jobs(("mmt-ard",), {}, args.seeds)
    # Every student in one pool (no phase waits for another's slowest job); aa on all but the first-seed-only cells.
    jobs = [job for phase in phases.values() for job in phase]
    aa_stages = {job_stage(job) for job in jobs if job_cell(job) in {*args.baselines, "mmt-ard", *cells}}
    aa_samples = None if "aa" in args.skip else args.aa_samples
    trained = train_students(out, scale, args.zoo, jobs, args.jobs, aa_samples, aa_stages)
    by_stage = {row["stage"]: row for row in trained}
    baselines, ablation, default = (
        [by_stage[job_stage(job)] for job in phase if job_stage(job) in by_stage]
        for phase in (phases["baselines"], phases["ablation"], default_jobs)
    )
    rows = given + default + baselines
    for row in rows + ablation:
        row["batch_size"] = args.batch_size
    default_name = default[0]["stage"].rsplit("-seed", 1)[0] if default else "(not run)"
    sections = [
        f"Command: `python benchmarks/cpu_protocol.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores). Students: {args.student_steps} "
        f"steps of batch {args.batch_size} (training PGD-{args.train_attack_steps}, eps 4/255), seeds {args.seeds}; "
        f"clean and PGD-10 (1 restart) on {args.eval_samples} test images per split. The mmt-ard preset's rows "
        f"are `{default_name}`.",
        "## Seen classes (in-distribution), PGD-10\n\n" + pgd_table(rows, "seen"),
        "## Unseen classes (zero-shot), PGD-10\n\n" + pgd_table(rows, "unseen"),
        checks_summary(rows),
    ]
    if ablation:
        context = [r for r in given + baselines if r["seed"] == args.seeds[0]]
        sections += [
            f"## Ablation (seed {args.seeds[0]}; on every seed: {', '.join(cells)}), seen, PGD-10\n\n"
            + pgd_table(context + ablation, "seen"),
            "## Ablation, unseen, PGD-10\n\n" + pgd_table(context + ablation, "unseen"),
            checks_summary(ablation),
        ]
    students = [r for r in baselines + ablation + default if r["role"] not in ("foundation", "teacher")]
    students = list({r["stage"]: r for r in students}.values())
    eff_table, steps_to_ard = efficiency(out, students)
    sections.append("## Training efficiency (held-out PGD-10 4/255 on 100 images every 20 steps)\n\n" + eff_table)
    saved = list({r["stage"]: r for r in rows + ablation}.values())
    write_report(out, sections, saved, started)
    aa_rows: list[dict] = []
    if "aa" not in args.skip:
        candidates = {f"student-{name}" for name in cells}
        chosen = [r for r in saved if r["stage"] in AA_GIVEN or r["stage"].rsplit("-seed", 1)[0] in candidates]
        chosen += [r for r in default + baselines if r not in chosen]
        if REPORT_ONLY:
            NOT_RUN.extend(f"{r['stage']} (aa)" for r in chosen if not aa_cached(out, r, args.aa_samples))
            chosen = [r for r in chosen if aa_cached(out, r, args.aa_samples)]
        aa_rows = evaluate_all_with_aa(out, scale, chosen, args.aa_samples, args.zoo, args.jobs)
        sections += [
            f"## aa (APGD-CE + APGD-T, 100 iterations each, 1 restart) beside PGD-10 at 4/255 on the same "
            f"{args.aa_samples} images per split, seen classes (the headline students, the candidates, the student "
            f"foundation)\n\n" + results_table(aa_rows, "seen"),
            "## aa at 4/255, unseen classes\n\n" + results_table(aa_rows, "unseen"),
            checks_summary(aa_rows) + " The checks compare aa with PGD-10 on the same images.",
        ]
        saved += [dict(row, stage=f"{row['stage']} (aa)") for row in aa_rows]
    first_seed = [r for r in students if r["seed"] == args.seeds[0]]
    plot_robust_vs_eps([r for r in rows if r["seed"] == args.seeds[0]], out / "robust_vs_eps.png")
    plot_training_curves(out, first_seed, out / "training_curves.png")
    plot_lambda_trajectories(out, first_seed, out / "lambda_r.png")
    if aa_rows:
        plot_pareto(aa_rows, out / "pareto.png", attack="aa", eps=TARGET_EPS)
    candidate_rows = [r for r in ablation if r["stage"].rsplit("-seed", 1)[0] in {f"student-{c}" for c in cells}]
    headline = headline_records(rows + [r for r in candidate_rows if r not in rows], aa_rows, steps_to_ard)
    for record in headline:
        record["method"] = "mmt-ard" if record["model"] == default_name else record["method"]
    atomic_write_text(out / "zoo-headline.json", json.dumps(headline, indent=2))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(docs / "zoo-headline.json", json.dumps(headline, indent=2))
        for plot in ("pareto.png", "lambda_r.png"):
            if (out / plot).is_file():
                (docs / plot).write_bytes((out / plot).read_bytes())
    if NOT_RUN:
        sections.append("Not in these tables (failed, or not run yet with --report-only): " + ", ".join(NOT_RUN) + ".")
    write_report(out, sections, saved, started)


if __name__ == "__main__":
    main()
