"""The CPU-scale protocol (spec section 5) as one function: foundations, teachers, students, evaluation.

Used by ``mmtard demo`` (small scale, minutes) and ``benchmarks/cpu_protocol.py`` (larger scale, seeds,
ablations). Every stage writes ``<out>/<stage>/model.safetensors``; a stage whose model file exists is
reused, so foundations and teachers are trained once for every student, and an interrupted run continues
where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mmtard.eval.run import EvalRequest, evaluate_bundle
from mmtard.fileio import atomic_write_text
from mmtard.methods import create_method, method_config
from mmtard.models import load_clip
from mmtard.train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, StudentConfig
from mmtard.train.trainer import train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolScale:
    """Sizes of one run of the protocol. Steps are optimizer steps of ``batch_size`` images."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    student_arch: str = "tiny-vit-s"
    teacher_arch: str = "tiny-vit-m"
    batch_size: int = 128
    train_samples: int | None = None
    foundation_steps: int = 500
    teacher_steps: int = 200
    student_steps: int = 200
    foundation_lr: float = 5e-4
    finetune_lr: float = 1e-4
    train_eps: float = 4 / 255
    train_attack_steps: int = 3
    eval_samples: int = 500
    eval_attacks: tuple[str, ...] = ("pgd",)
    eval_eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    eval_steps: int | None = 10
    eval_every: int = 0  # for the distillation students (mmt-ard, reference, ard): training-efficiency curves
    device: str = "auto"


DEMO_SCALE = ProtocolScale(
    dataset="digits",
    batch_size=64,
    foundation_steps=100,
    teacher_steps=40,
    student_steps=40,
    train_attack_steps=2,
    eval_samples=80,
)


@dataclass
class StageSpec:
    """One training run of the protocol: what it trains from and with which method."""

    name: str
    arch: str
    method: str
    pretrained: str
    classes: str
    steps: int
    lr: float
    teachers: dict[str, str] = field(default_factory=dict)  # role -> stage name
    method_overrides: dict = field(default_factory=dict)
    seed: int = 0
    eval_every: int = 0  # held-out PGD evaluation period during training (0: none)
    weight_decay: float = 1e-4


def stage_config(scale: ProtocolScale, stage: StageSpec, out: Path) -> RunConfig:
    attack = {"eps": scale.train_eps, "steps": scale.train_attack_steps}
    overrides = {**(attack if stage.method not in ("clean-ft",) else {}), **stage.method_overrides}
    if stage.method in ("mmt-ard", "reference"):
        overrides.setdefault("cache_clean_teacher", True)
    return RunConfig(
        output_dir=str(out / stage.name),
        device=scale.device,
        student=StudentConfig(arch=stage.arch, pretrained=stage.pretrained),
        teachers={
            role: ModelConfig(arch=scale.teacher_arch, pretrained=str(out / src / "model.safetensors"))
            for role, src in stage.teachers.items()
        },
        method=method_config(stage.method, **overrides),
        data=DataConfig(
            dataset=scale.dataset,
            dir=scale.data_dir,
            classes=stage.classes,
            samples=scale.train_samples,
            eval_classes=stage.classes,
            eval_samples=min(scale.eval_samples, 100),
            batch_size=scale.batch_size,
        ),
        train=OptimConfig(
            steps=stage.steps,
            lr=stage.lr,
            weight_decay=stage.weight_decay,
            seed=stage.seed,
            checkpoint_every=max(stage.steps // 2, 1),
        ),
        eval=EvalConfig(
            every=stage.eval_every, eps=[scale.train_eps], steps=scale.eval_steps or 10, final=stage.eval_every > 0
        ),
    ).validate()


def run_stage(scale: ProtocolScale, stage: StageSpec, out: Path, progress: bool) -> Path:
    """Train one stage unless its model file exists; resume it if it was interrupted. Returns the model file."""
    model_file = out / stage.name / "model.safetensors"
    if model_file.is_file():
        logger.info("stage %s: reusing %s", stage.name, model_file)
        return model_file
    cfg = stage_config(scale, stage, out)
    resume = "latest" if (out / stage.name / "checkpoints" / "latest").is_file() else None
    started = time.perf_counter()
    train(cfg, resume=resume, progress=progress)
    atomic_write_text(
        out / stage.name / "train_time.json",
        json.dumps({"seconds": time.perf_counter() - started, "steps": stage.steps}),
    )
    return model_file


def evaluate_stage(scale: ProtocolScale, arch: str, model_file: Path, progress: bool) -> dict[str, dict]:
    """Seen (in-distribution) and unseen (zero-shot) accuracy, clean and under each attack and eps."""
    radii = "-".join(str(round(e * 255, 3)) for e in scale.eval_eps)
    cache = model_file.parent / f"protocol_eval_{'-'.join(scale.eval_attacks)}_{scale.eval_samples}_eps{radii}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    bundle = load_clip(arch, str(model_file), device=scale.device if scale.device != "auto" else _auto_device())
    results = {}
    journal = model_file.parent / "eval_journal"  # an interrupted evaluation continues from its last batch
    for split in ("seen", "unseen"):
        request = EvalRequest(
            datasets=[scale.dataset],
            data_dirs=[scale.data_dir],
            classes=split,
            samples=scale.eval_samples,
            attacks=scale.eval_attacks,
            eps=scale.eval_eps,
            steps=scale.eval_steps,
            progress=progress,
            journal_dir=str(journal),
        )
        (results[split],) = evaluate_bundle(bundle, request)
    atomic_write_text(cache, json.dumps(results, indent=2))
    shutil.rmtree(journal, ignore_errors=True)
    return results


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def protocol_stages(
    scale: ProtocolScale, methods: Sequence[str], seeds: Sequence[int] = (0,), variants: dict[str, dict] | None = None
) -> list[tuple[str, StageSpec]]:
    """``(role, stage)`` in training order: foundations, teachers, then one student per method and seed.

    ``variants`` adds students named ``<name>`` with method overrides, e.g. ablations of DIW x balance:
    ``{"mmt-ard[diw=none]": {"method": "mmt-ard", "diw": "none"}}``.
    """
    fs, ft = "foundation-student", "foundation-teacher"
    stages = [
        (
            "foundation",
            StageSpec(
                fs,
                scale.student_arch,
                "clean-ft",
                "none",
                "all",
                scale.foundation_steps,
                scale.foundation_lr,
                weight_decay=0.05,
            ),
        ),
        (
            "foundation",
            StageSpec(
                ft,
                scale.teacher_arch,
                "clean-ft",
                "none",
                "all",
                scale.foundation_steps,
                scale.foundation_lr,
                weight_decay=0.05,
            ),
        ),
        (
            "teacher",
            StageSpec(
                "teacher-clean",
                scale.teacher_arch,
                "clean-ft",
                _model(ft),
                "seen",
                scale.teacher_steps,
                scale.finetune_lr,
            ),
        ),
        (
            "teacher",
            StageSpec(
                "teacher-robust",
                scale.teacher_arch,
                "tecoa",
                _model(ft),
                "seen",
                scale.teacher_steps,
                scale.finetune_lr,
            ),
        ),
    ]
    students = {name: {"method": name} for name in methods}
    students.update(variants or {})
    for name, spec in students.items():
        spec = dict(spec)
        method = spec.pop("method")
        roles = create_method(method_config(method, **spec)).teacher_roles  # "original" is the trainer's copy
        teachers = {role: f"teacher-{role}" for role in roles if role != "original"}
        for seed in seeds:
            stage = StageSpec(
                f"student-{name}-seed{seed}",
                scale.student_arch,
                method,
                _model(fs),
                "seen",
                scale.student_steps,
                scale.finetune_lr,
                teachers,
                spec,
                seed,
                scale.eval_every if name in DISTILLATION_PRESETS else 0,
            )
            stages.append((name, stage))
    return stages


DISTILLATION_PRESETS = ("mmt-ard", "reference", "ard")


def _model(stage: str) -> str:
    return f"@{stage}"  # resolved against the run folder in run_protocol


def run_protocol(
    out: str | Path,
    scale: ProtocolScale,
    methods: Sequence[str] = ("tecoa", "ard", "mmt-ard"),
    seeds: Sequence[int] = (0,),
    variants: dict[str, dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every stage and evaluate every model; one row per model with seen and unseen results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for role, stage in protocol_stages(scale, methods, seeds, variants):
        if stage.pretrained.startswith("@"):
            stage = replace(stage, pretrained=str(out / stage.pretrained[1:] / "model.safetensors"))
        model_file = run_stage(scale, stage, out, progress)
        results = evaluate_stage(scale, stage.arch, model_file, progress)
        timing = (
            json.loads((out / stage.name / "train_time.json").read_text())
            if (out / stage.name / "train_time.json").is_file()
            else {}
        )
        rows.append(
            {
                "stage": stage.name,
                "role": role,
                "method": stage.method,
                "seed": stage.seed,
                "arch": stage.arch,
                "train_seconds": timing.get("seconds"),
                "steps": stage.steps,
                **results,
            }
        )
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=2))
    return rows
