"""The CPU-scale protocol (spec section 5) as one function: foundations, teachers, students, evaluation.

Used by ``mmtard demo`` (small scale, minutes, trains everything) and ``benchmarks/zoo_benchmark.py`` (the zoo's
given foundations and teachers, seeds, ablations). Every trained stage writes ``<out>/<stage>/model.safetensors``;
a stage whose model file exists is reused, so foundations and teachers are trained once for every student, and an
interrupted run continues where it stopped. With a zoo (``../shared/zoo/rebuild.py --out DIR``) the foundations
and teachers are read from ``DIR/<stage>/model.safetensors`` and never trained.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mmtard.errors import ConfigError
from mmtard.eval.run import EvalRequest, evaluate_bundle
from mmtard.fileio import atomic_write_text
from mmtard.methods import method_class, method_config, plan_teachers
from mmtard.models import load_clip
from mmtard.train import RunDir
from mmtard.train.config import DataConfig, EvalConfig, OptimConfig, RunConfig, StudentConfig, TeacherConfig
from mmtard.train.trainer import train

logger = logging.getLogger(__name__)

GIVEN_STAGES = ("foundation-student", "foundation-teacher", "teacher-clean", "teacher-robust")
REBUILD_COMMAND = "python ../shared/zoo/rebuild.py --out {zoo}"
TRAIN_TIME_FILE = "train_time.json"


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
    eval_every: int = 0  # for students with teachers: held-out PGD curves (training efficiency)
    device: str = "auto"
    # The students' distillation images and the seen-class images they are evaluated on (spec section 5): the
    # training split (``train``, None, None), or a transfer set no zoo model trained on: one half of the test
    # split (``test``, ``1/2``), the other half evaluated (``2/2``). Unseen classes are evaluated on the whole split.
    student_split: str = "train"
    student_part: str | None = None
    seen_eval_part: str | None = None

    def eval_part(self, split: str) -> str | None:
        """The part of the test split evaluated for ``split`` (``seen`` or ``unseen``)."""
        return self.seen_eval_part if split == "seen" else None


DEMO_SCALE = ProtocolScale(
    dataset="digits",
    batch_size=64,
    foundation_steps=100,
    teacher_steps=40,
    student_steps=40,
    train_attack_steps=2,
    eval_samples=80,
)

# The zoo's architectures (../shared/zoo/README.md) and the students' budget of the benchmark: 200 steps of 64.
ZOO_SCALE = ProtocolScale(
    dataset="cifar10",
    teacher_arch="tiny-vit-l",
    batch_size=64,
    student_steps=200,
    finetune_lr=1e-4,
    train_attack_steps=2,
    eval_samples=200,
    eval_every=20,
)
#: Where the zoo benchmark's students distil (issue 25): ``train``, the images every zoo model trained on (the
#: clean teacher has memorised them: its distribution there is the label), or ``transfer``, half of the test
#: split that no zoo model saw, with the other half evaluated (P0 and P1 of the protocol check).
DISTILL_IMAGES = {
    "train": {},
    "transfer": {"student_split": "test", "student_part": "1/2", "seen_eval_part": "2/2"},
}


@dataclass
class StageSpec:
    """One training run of the protocol: what it trains from and with which method.

    ``pretrained`` and the teachers name other stages (``"@foundation-student"``, ``{"robust": "teacher-robust"}``),
    resolved to model files when the protocol runs.
    """

    name: str
    arch: str
    method: str
    pretrained: str
    classes: str
    steps: int
    lr: float
    teachers: dict[str, str] = field(default_factory=dict)  # teacher name -> stage name
    teacher_kinds: dict[str, str] = field(default_factory=dict)  # teacher name -> kind; {} for the standard ones
    method_overrides: dict = field(default_factory=dict)
    seed: int = 0
    eval_every: int = 0  # held-out PGD evaluation period during training (0: none)
    weight_decay: float = 1e-4
    attack_steps: int | None = None  # PGD steps inside training; None: the scale's train_attack_steps
    split: str = "train"  # the training images: split, and part of it (``k/n``), and the held-out images' part
    part: str | None = None
    eval_part: str | None = None
    finetune: str = "full"  # the student's ``student.finetune``: full, or lora


def given_models(zoo: str | Path) -> dict[str, Path]:
    """The zoo's foundations and teachers: ``{stage: zoo/stage/model.safetensors}``.

    Raises:
        ConfigError: the folder or one of its four model files is missing or empty; the message names the
            command that rebuilds the zoo.
    """
    zoo = Path(zoo)
    files = {stage: RunDir(zoo / stage).model for stage in GIVEN_STAGES}
    missing = [stage for stage, path in files.items() if not path.is_file() or path.stat().st_size == 0]
    if missing:
        what = "does not exist" if not zoo.is_dir() else f"lacks {', '.join(f'{s}/model.safetensors' for s in missing)}"
        raise ConfigError(
            f"--zoo: '{zoo}' {what}; build it with `{REBUILD_COMMAND.format(zoo=zoo)}` (see ../shared/zoo/README.md)"
        )
    return files


def stage_config(scale: ProtocolScale, stage: StageSpec, out: Path, models: Mapping[str, Path]) -> RunConfig:
    """The run config of one stage; ``models`` maps stage names to their model files."""
    probe = method_config(stage.method, **stage.method_overrides)
    overrides = dict(stage.method_overrides)
    if probe.attacking:
        attack_steps = scale.train_attack_steps if stage.attack_steps is None else stage.attack_steps
        overrides = {"eps": scale.train_eps, "steps": attack_steps, **overrides}
    configured = {name: stage.teacher_kinds.get(name) for name in stage.teachers}
    if plan_teachers(method_class(stage.method), probe, configured).names_of_kind("clean"):
        # a deterministic pipeline: the clean teachers' logits are cached
        overrides.setdefault("cache_clean_teacher", True)
    teachers = {
        name: TeacherConfig(
            arch=stage_arch(scale, source), pretrained=str(models[source]), kind=stage.teacher_kinds.get(name)
        )
        for name, source in stage.teachers.items()
    }
    return RunConfig(
        output_dir=str(out / stage.name),
        device=scale.device,
        student=StudentConfig(arch=stage.arch, pretrained=stage.pretrained, finetune=stage.finetune),
        teachers=teachers,
        method=method_config(stage.method, **overrides),
        data=DataConfig(
            dataset=scale.dataset,
            dir=scale.data_dir,
            split=stage.split,
            part=stage.part,
            eval_part=stage.eval_part,
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
            every=stage.eval_every,
            eps=[scale.train_eps],
            steps=scale.eval_steps or 10,
            final=stage.eval_every > 0,
        ),
    ).validate()


def stage_arch(scale: ProtocolScale, stage: str) -> str:
    """The architecture of a stage's model: the student's for its foundation and the students, else the
    teachers'."""
    return scale.student_arch if stage == "foundation-student" or stage.startswith("student-") else scale.teacher_arch


def run_stage(scale: ProtocolScale, stage: StageSpec, out: Path, models: Mapping[str, Path], progress: bool) -> Path:
    """Train one stage unless its model file exists; resume it if it was interrupted. Returns the model file."""
    run = RunDir(out / stage.name)
    if run.model.is_file():
        logger.info("stage %s: reusing %s", stage.name, run.model)
        return run.model
    cfg = stage_config(scale, stage, out, models)
    started = time.perf_counter()
    train(cfg, resume="latest" if run.latest.is_file() else None, progress=progress)
    timing = {"seconds": time.perf_counter() - started, "steps": stage.steps}
    atomic_write_text(run.path / TRAIN_TIME_FILE, json.dumps(timing))
    return run.model


def evaluate_stage(
    scale: ProtocolScale,
    arch: str,
    model_file: Path,
    stage_dir: Path,
    progress: bool,
    interpolate: tuple[Path, float] | None = None,
) -> dict:
    """Seen (in-distribution) and unseen (zero-shot) accuracy, clean and under each attack and eps.

    The result is cached in ``stage_dir`` under a name that carries the attacks, sample count, radii and the
    seen images' part. ``interpolate``: ``(base, alpha)`` evaluates ``alpha * model + (1 - alpha) * base`` in the
    image tower's weight space (WiSE-FT; ``load_clip(vision_weights_alpha=...)``) instead of the model itself.
    """
    radii = "-".join(str(round(e * 255, 3)) for e in scale.eval_eps)
    part = f"_seen{scale.seen_eval_part.replace('/', 'of')}" if scale.seen_eval_part else ""
    cache = stage_dir / f"protocol_eval_{'-'.join(scale.eval_attacks)}_{scale.eval_samples}_eps{radii}{part}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    device = scale.device if scale.device != "auto" else _auto_device()
    if interpolate is None:
        bundle = load_clip(arch, str(model_file), device=device)
    else:
        base, alpha = interpolate
        bundle = load_clip(arch, str(base), device=device, vision_weights=model_file, vision_weights_alpha=alpha)
    results = {}
    journal = stage_dir / "eval_journal"  # an interrupted evaluation continues from its last batch
    for split in ("seen", "unseen"):
        request = EvalRequest(
            datasets=[scale.dataset],
            data_dirs=[scale.data_dir],
            classes=split,
            samples=scale.eval_samples,
            part=scale.eval_part(split),
            attacks=scale.eval_attacks,
            eps=scale.eval_eps,
            steps=scale.eval_steps,
            progress=progress,
            journal_dir=str(journal),
        )
        (results[split],) = evaluate_bundle(bundle, request)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(results, indent=2))
    shutil.rmtree(journal, ignore_errors=True)
    return results


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def has_teachers(method: str, overrides: Mapping | None = None) -> bool:
    """Whether the method distils from a clean or robust teacher (its students get held-out curves)."""
    return bool(plan_teachers(method_class(method), method_config(method, **(overrides or {}))).kinds)


def protocol_stages(
    scale: ProtocolScale,
    methods: Sequence[str],
    seeds: Sequence[int] = (0,),
    variants: Mapping[str, Mapping] | None = None,
) -> list[tuple[str, StageSpec]]:
    """``(role, stage)`` in training order: foundations, teachers, then one student per method and seed.

    ``variants`` adds students named ``<name>`` with method overrides, e.g. ablations of DIW x balance:
    ``{"diw=none": {"method": "mmt-ard", "diw": "none"}}``. A variant's ``train`` (``{"steps": 400, "lr": 1e-3,
    "weight_decay": 0.1, "attack_steps": 3}``) replaces the scale's student recipe for that student. A variant's
    ``more_teachers`` (``{"fare": "robust"}``)
    adds a teacher of that kind, stage ``teacher-<method>``, trained from the teacher foundation with that preset
    like the two standard teachers (once, before the first student; with ``seeds=()`` only those teachers).
    A variant's ``teacher_stages`` (``{"clean": "foundation-student"}``) points a teacher at any stage (the student's
    own foundation as a plain anchor; the robust teacher as a third teacher), and ``teacher_kinds`` gives the kind
    of a teacher it adds (``{"robust_clean": "clean"}``). A variant's ``finetune`` (``"lora"``) is the student's
    ``student.finetune``.
    """
    fs, ft = "foundation-student", "foundation-teacher"
    foundation = dict(method="clean-ft", pretrained="none", classes="all", steps=scale.foundation_steps)
    foundation.update(lr=scale.foundation_lr, weight_decay=0.05)
    teacher = dict(arch=scale.teacher_arch, pretrained=_model(ft), classes="seen", steps=scale.teacher_steps)
    teacher.update(lr=scale.finetune_lr)
    stages = [
        ("foundation", StageSpec(name=fs, arch=scale.student_arch, **foundation)),
        ("foundation", StageSpec(name=ft, arch=scale.teacher_arch, **foundation)),
        ("teacher", StageSpec(name="teacher-clean", method="clean-ft", **teacher)),
        ("teacher", StageSpec(name="teacher-robust", method="tecoa", **teacher)),
    ]
    students = {name: {"method": name} for name in methods}
    students.update(variants or {})
    more_teacher_stages = {
        f"teacher-{preset}": StageSpec(name=f"teacher-{preset}", method=preset, **teacher)
        for spec in students.values()
        for preset in spec.get("more_teachers", {})
    }
    stages += [("teacher", stage) for stage in more_teacher_stages.values()]
    for name, spec in students.items():
        overrides = dict(spec)
        method = overrides.pop("method")
        more = overrides.pop("more_teachers", {})
        at_stage, extra_kinds = overrides.pop("teacher_stages", {}), overrides.pop("teacher_kinds", {})
        recipe = {"steps": scale.student_steps, "lr": scale.finetune_lr, **overrides.pop("train", {})}
        finetune = overrides.pop("finetune", "full")
        plan = plan_teachers(method_class(method), method_config(method, **overrides))
        teachers = {role: f"teacher-{role}" for role in plan.kinds}
        kinds = ({role: role for role in teachers} | dict(more) | dict(extra_kinds)) if more or extra_kinds else {}
        teachers.update({preset: f"teacher-{preset}" for preset in more})
        teachers.update(at_stage)
        for seed in seeds:
            stage = StageSpec(
                name=f"student-{name}-seed{seed}",
                arch=scale.student_arch,
                method=method,
                pretrained=_model(fs),
                classes="seen",
                teachers=teachers,
                teacher_kinds=kinds,
                method_overrides=overrides,
                seed=seed,
                eval_every=scale.eval_every if has_teachers(method, overrides) else 0,
                split=scale.student_split,
                part=scale.student_part,
                eval_part=scale.seen_eval_part,
                finetune=finetune,
                **recipe,
            )
            stages.append((name, stage))
    return stages


def _model(stage: str) -> str:
    return f"@{stage}"  # resolved to the stage's model file in run_protocol


def run_protocol(
    out: str | Path,
    scale: ProtocolScale,
    methods: Sequence[str] = ("tecoa", "ard", "mmt-ard"),
    seeds: Sequence[int] = (0,),
    variants: Mapping[str, Mapping] | None = None,
    progress: bool = True,
    zoo: str | Path | None = None,
    rows_for: Collection[str] | None = None,
) -> list[dict]:
    """Run every stage and evaluate every model; one row per model with seen and unseen results.

    Args:
        out: the run folder: ``<out>/<stage>/`` per stage, and ``rows.json``.
        scale: sizes.
        methods: students trained with each preset's defaults.
        seeds: one student per method (and variant) and seed.
        variants: more students, named, with method overrides.
        progress: show progress bars.
        zoo: a folder with the four given models (``given_models``); they are evaluated, not trained.
        rows_for: the stages to evaluate and return rows for (the others are trained when missing, not evaluated);
            None: every stage.

    Raises:
        ConfigError: the zoo is missing or incomplete (checked before anything is written).
    """
    models = dict(given_models(zoo)) if zoo is not None else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for role, stage in protocol_stages(scale, methods, seeds, variants):
        if stage.name not in models:
            if stage.pretrained.startswith("@"):
                source = stage.pretrained[1:]
                stage = replace(stage, pretrained=str(models.get(source, RunDir(out / source).model)))
            models[stage.name] = run_stage(scale, stage, out, models, progress)
        if rows_for is None or stage.name in rows_for:
            rows.append(stage_row(scale, role, stage, models[stage.name], out, progress))
    atomic_write_text(out / "rows.json", json.dumps(rows, indent=2))
    return rows


def stage_row(scale: ProtocolScale, role: str, stage: StageSpec, model_file: Path, out: Path, progress: bool) -> dict:
    """One row of :func:`run_protocol`: the stage, its training time and its evaluation (cached on disk; the
    model file is read only when the evaluation is not)."""
    results = evaluate_stage(scale, stage.arch, model_file, out / stage.name, progress)
    timing_file = out / stage.name / TRAIN_TIME_FILE
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    return {
        "stage": stage.name,
        "role": role,
        "method": stage.method,
        "seed": stage.seed,
        "arch": stage.arch,
        "train_seconds": timing.get("seconds"),
        "steps": stage.steps,
        **results,
    }
