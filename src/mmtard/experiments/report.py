"""Tables and plots of a CPU-protocol run: ``report.md``, ``robust_vs_eps.png``, ``training_curves.png``, the
clean-vs-robust Pareto plot and the balance's ``lambda_R`` trajectories.

Rows come from ``mmtard.experiments.protocol.run_protocol``; several seeds of one student are shown as mean ± std.
"""

from __future__ import annotations

import platform
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mmtard.errors import import_optional
from mmtard.eval.report import robust_column
from mmtard.fileio import atomic_path, atomic_write_text
from mmtard.train import RunDir


def _accuracies(row: dict, split: str) -> list[float]:
    record = row[split]
    return [record["clean_acc"]] + [entry["acc"] for entry in record["robust"]]


def _columns(rows: Sequence[dict]) -> list[str]:
    first = rows[0]["seen"]
    return ["clean"] + [robust_column(entry) for entry in first["robust"]]


def group_by_model(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows of the same model (all seeds of one student) together, in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["stage"].rsplit("-seed", 1)[0]].append(row)
    return groups


def robust_accuracy(record: dict, attack: str, eps: str) -> float | None:
    """The robust accuracy of ``record`` under ``attack`` at ``eps`` (``"4/255"``), or None if not measured."""
    return next((e["acc"] for e in record["robust"] if e["attack"] == attack and e["eps"] == eps), None)


def clean_accuracy(row: dict, split: str) -> float:
    """``row``'s clean accuracy on ``split``: on every test image of the split where the row has it (``clean_all``,
    as the tables report it), else on the robust evaluation's images."""
    return row.get("clean_all", row)[split]["clean_acc"]


def std(values: list[float]) -> float:
    """The sample standard deviation; 0 for one value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
    """One value as it is; several (one per seed) as ``mean ± std``."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def results_table(rows: Sequence[dict], split: str) -> str:
    columns = _columns(rows)
    lines = ["| model | role | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for name, group in group_by_model(rows).items():
        per_column = list(zip(*[_accuracies(row, split) for row in group]))
        cells = [mean_std(list(values)) for values in per_column]
        lines.append(f"| {name} | {group[0]['role']} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the ``plots`` extra)."""
    matplotlib = import_optional("matplotlib", "plots", "the protocol report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


def plot_robust_vs_eps(rows: Sequence[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split, title in zip(
        axes, ("seen", "unseen"), ("seen classes (in-distribution)", "unseen classes (zero-shot)")
    ):
        for name, group in group_by_model(rows).items():
            record = group[0][split]
            eps = [0.0] + [entry["eps_value"] * 255 for entry in record["robust"]]
            values = [statistics.mean(v) for v in zip(*[_accuracies(row, split) for row in group])]
            ax.plot(
                eps,
                values,
                marker="o",
                label=name,
                linestyle="--" if group[0]["role"] in ("foundation", "teacher") else "-",
            )
        attack = record["robust"][0] if record["robust"] else {"attack": "", "steps": ""}
        ax.set_title(title)
        ax.set_xlabel(f"eps (x/255), {attack['attack']}-{attack['steps']} L-inf")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_training_curves(out: Path, rows: Sequence[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        if row["role"] in ("foundation",):
            continue
        metrics = RunDir(out / row["stage"]).read_metrics()
        steps = [m["step"] for m in metrics]
        axes[0].plot(steps, [m["loss"] for m in metrics], label=row["stage"])
        if "lambda_R" in metrics[0] and "L_C" in metrics[0]:
            axes[1].plot(steps, [m["lambda_R"] for m in metrics], label=f"{row['stage']} lambda_R")
    axes[0].set_title("training loss (each method's own objective)")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].set_title("robust-teacher weight lambda_R (MMT-ARD balance)")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def pareto_points(rows: Sequence[dict], split: str, attack: str = "aa", eps: str = "4/255") -> list[tuple]:
    """One ``(name, seeds, clean mean, clean std, robust mean, robust std)`` per model that has ``attack`` at
    ``eps`` on ``split``, clean accuracy as :func:`clean_accuracy` gives it."""
    points = []
    for name, group in group_by_model(rows).items():
        robust = [robust_accuracy(row[split], attack, eps) for row in group]
        if None in robust:
            continue
        clean = [clean_accuracy(row, split) for row in group]
        points.append((name, len(group), statistics.mean(clean), std(clean), statistics.mean(robust), std(robust)))
    return points


def plot_pareto(
    rows: Sequence[dict], path: Path, attack: str = "aa", eps: str = "4/255", lines: Sequence[Sequence[str]] = ()
) -> None:
    """Clean against robust accuracy (``attack`` at ``eps``), one point per model (:func:`pareto_points`): the mean
    over its seeds with standard-deviation error bars; seen and unseen classes side by side. ``lines``: model names
    joined by a dashed grey line in that order (an interpolation frontier), over the models that have the point.
    The interpolation controls are small grey crosses on those lines, one legend entry for all of them, so the
    colours and the legend stay with the models compared."""
    plt = pyplot()
    groups = group_by_model(rows)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    for ax, split, title in zip(axes, ("seen", "unseen"), ("seen classes (in-distribution)", "unseen (zero-shot)")):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 models without a repeated colour
        points = pareto_points(rows, split, attack, eps)
        at = {point[0]: (point[2], point[4]) for point in points}
        for line in lines:
            xy = [at[name] for name in line if name in at]
            if len(xy) > 1:
                ax.plot(*zip(*xy), linestyle="--", color="grey", linewidth=1, zorder=0)
        controls = 0
        for name, seeds, clean, clean_std, robust, robust_std in points:
            given = groups[name][0]["role"] in ("foundation", "teacher")
            if groups[name][0].get("control") == "interpolation":
                label = "_" if controls else "interpolation controls (alpha 0 to 1 on each dashed line)"
                ax.plot(clean, robust, marker="x", color="grey", markersize=5, linestyle="none", label=label)
                controls += 1
                continue
            ax.errorbar(
                clean,
                robust,
                xerr=clean_std,
                yerr=robust_std,
                marker="s" if given else "o",
                capsize=3,
                linestyle="none",
                label=f"{name} ({'given' if given else f'{seeds} seed' + ('s' if seeds > 1 else '')})",
            )
        ax.set_title(title)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy (%), {attack} L-inf {eps}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: it hid points
    fig.tight_layout()
    save_figure(fig, path)


def plot_lambda_trajectories(out: Path, rows: Sequence[dict], path: Path) -> None:
    """``lambda_R`` against the step for every student whose metrics log it (one line per model, first seed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, group in group_by_model(rows).items():
        metrics = RunDir(out / group[0]["stage"]).read_metrics()
        if metrics and "lambda_R" in metrics[0] and "lambda_C" in metrics[0]:
            ax.plot([m["step"] for m in metrics], [m["lambda_R"] for m in metrics], label=name)
    ax.set_title("robust-teacher weight lambda_R of each balance")
    ax.set_xlabel("step")
    ax.set_ylabel("lambda_R")
    ax.grid(alpha=0.3)
    if ax.lines:  # no student logs lambda_R (e.g. baselines only): an empty plot, without an empty legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_protocol_report(out: str | Path, rows: Sequence[dict], command: str, scale_text: str) -> Path:
    out = Path(out)
    plot_robust_vs_eps(rows, out / "robust_vs_eps.png")
    plot_training_curves(out, rows, out / "training_curves.png")
    attack = "aa" if any(robust_accuracy(r["seen"], "aa", "4/255") is not None for r in rows) else "pgd"
    plot_pareto(rows, out / "pareto.png", attack=attack)
    plot_lambda_trajectories(out, [r for r in rows if r["role"] not in ("foundation", "teacher")], out / "lambda_r.png")
    samples = rows[0]["seen"]["samples"], rows[0]["unseen"]["samples"]
    machine = f"{platform.node() or 'unknown'} ({platform.machine()}, {platform.processor() or 'cpu'})"
    text = f"""# MMT-ARD on the CPU-scale protocol

Command: `{command}`
Machine: {machine}, dataset `{rows[0]["seen"]["dataset"]}`.
Scale: {scale_text}

Accuracy in percent. Robust columns name the attack, eps (L-inf, fraction of the pixel range), steps
and restarts; an image misclassified when clean counts as not robust.

## Seen classes (in-distribution, {samples[0]} test images)

{results_table(rows, "seen")}

## Unseen classes (zero-shot, 5-way heads, {samples[1]} test images)

{results_table(rows, "unseen")}

The comparison means something only if each teacher beats the student's foundation on its own axis:
the clean teacher on clean accuracy, the robust teacher on robust accuracy.

This run checks the whole pipeline at a small scale and does not show the ordering of the methods on the
calibrated protocol, where adversarial fine-tuning forgets zero-shot accuracy as at scale: that comparison, with
its seeds and intervals, is `BENCHMARKS.md` section 2 (`benchmarks/zoo_benchmark.py`).

![robust accuracy against eps](robust_vs_eps.png)

![training curves](training_curves.png)

Clean against robust accuracy ({attack} at 4/255), mean and standard deviation over seeds:

![clean vs robust](pareto.png)

The robust teacher's weight lambda_R during training (students with two teachers):

![lambda_R](lambda_r.png)
"""
    atomic_write_text(out / "report.md", text)
    return out / "report.md"
