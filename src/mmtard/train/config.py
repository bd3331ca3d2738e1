"""The run configuration's typed dataclasses and their validation (every field checked, the first bad one named).

Reading them from YAML and ``--set`` overrides is :mod:`mmtard.train.config_io`'s job; the resume rule is
:mod:`mmtard.train.resume`'s. The teachers a run's method distils from follow :mod:`mmtard.methods.teachers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmtard.data import parse_part
from mmtard.distributed import TRAIN_PRECISIONS
from mmtard.errors import ConfigError
from mmtard.methods import MethodConfig, TeacherPlan, method_class, plan_teachers
from mmtard.models.vision_weights import check_vision_alpha
from mmtard.units import NORMS, RADIUS
from mmtard.validate import MAX_TRAIN_SEED, check_choice, check_number, check_whole_number

FINETUNE_MODES = ("full", "lora")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class ModelConfig:
    """A CLIP model: open_clip architecture (or ``hf-hub:`` id) and its weights; ``vision_weights``, a published
    image-tower file (RobustVLM's FARE / TeCoA) loaded over them, ``vision_weights_alpha`` its weight against the
    base tower (see :mod:`mmtard.models.vision_weights`)."""

    arch: str = "tiny-vit-s"
    pretrained: str = "none"
    trust_checkpoint: bool = False
    vision_weights: str | None = None
    vision_weights_alpha: float = 1.0


@dataclass
class TeacherConfig(ModelConfig):
    """A teacher: a model and its ``kind``, ``clean`` (distilled on the clean images ``x``) or ``robust`` (on
    the adversarial images ``x'``). The teachers named ``clean`` and ``robust`` have those kinds (``kind`` may
    be left out); any other name needs one."""

    kind: str | None = None


@dataclass
class LoraConfig:
    """LoRA through peft. ``targets`` are module-name suffixes inside the image tower; open_clip ViTs
    compute attention with ``nn.MultiheadAttention``, whose ``out_proj`` is bypassed by its fused kernel,
    so the default adapts the MLP layers ``c_fc`` and ``c_proj``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj"])


@dataclass
class StudentConfig(ModelConfig):
    """The student: ``finetune: full`` trains the whole image tower, ``lora`` only LoRA adapters.
    The text tower is always frozen."""

    finetune: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Training and held-out data. ``batch_size`` is the global batch, split across processes.

    ``augment``: open_clip's training augmentation (:class:`mmtard.data.augment.TrainAugment`: random
    resized crop, scale 0.9-1, plus a horizontal flip) on every training batch, drawn per step from the
    seed (a resumed run augments as the uninterrupted one); held-out images are never augmented. It
    cannot be combined with ``method.cache_clean_teacher``, whose cached logits belong to one image per
    dataset index.

    ``part`` / ``eval_part``: ``"k/n"`` keeps only the k-th of n disjoint, class-balanced parts of the split
    (:func:`mmtard.data.part_positions`), before the class and sample selection. Distilling on ``split: test,
    part: 1/2`` and evaluating on ``eval_split: test, eval_part: 2/2`` gives a transfer set the teachers never
    trained on, disjoint from the held-out images (spec section 5).
    """

    dataset: str = "cifar10"
    dir: str | None = None
    split: str = "train"
    classes: str = "seen"
    samples: int | None = None
    batch_size: int = 128
    workers: int = 0
    eval_split: str = "test"
    eval_classes: str = "seen"
    eval_samples: int | None = 200
    augment: bool = False
    part: str | None = None
    eval_part: str | None = None


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warm-up of ``warmup`` (fraction of the steps).

    ``on_nonfinite``: what a step whose loss is NaN or infinite does: ``stop`` (the default) ends the run
    with an error naming the step and the last good checkpoint; ``skip`` drops that batch's update and
    counts it (``skipped_steps`` in ``metrics.jsonl``). ``dist_timeout_s``: under torchrun, how long a
    process waits for the others in a collective before the run ends with an error (a stalled or dead
    worker); raise it if a held-out evaluation, which rank 0 runs alone, takes longer.

    ``seed``: a whole number from 0 to :data:`mmtard.validate.MAX_TRAIN_SEED` (2**32 - 1).

    ``compile``: ``torch.compile`` the student's and the teachers' zero-shot classifiers (image tower,
    normalisation and prototypes) for the training steps; results equal eager ones within floating-point
    reordering, not bitwise. The first step pays the compilation (its seconds are logged as
    ``first_step_s``); it needs a C++ compiler on the CPU and Triton on CUDA.
    """

    steps: int = 100
    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0.07
    grad_clip: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"
    dist_timeout_s: float = 600.0
    compile: bool = False


@dataclass
class EvalConfig:
    """Periodic held-out evaluation (clean and PGD robust) every ``every`` steps (0: never) and, with
    ``final``, once at the end (``final_eval.json``). ``norm`` left out is the training attack's, so a run
    trained with L2 is evaluated with L2."""

    every: int = 0
    attack: str = "pgd"
    eps: list[float] = field(default_factory=lambda: [4 / 255], metadata=RADIUS)
    steps: int = 10
    batch_size: int = 128
    final: bool = True
    norm: str | None = None  # linf or l2; None: the training attack's (method.norm)


@dataclass
class RunConfig:
    """Everything one training run needs. ``teachers`` maps a teacher's name to its model and kind, in the
    order the method computes and logs their terms (``clean`` and ``robust`` are the two standard teachers)."""

    output_dir: str = "runs/default"
    device: str = "auto"
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def teacher_plan(self) -> TeacherPlan:
        """The teachers the method reads (:func:`mmtard.methods.teachers.plan_teachers` of the configured teachers:
        those of the kinds the method takes, the others :attr:`TeacherPlan.unused`), checked; builds no method.

        Raises:
            ConfigError: naming ``teachers.<name>`` or ``teachers.<name>.kind`` for teachers the method refuses,
                or the ``method.`` field of a bad method setting (``method.inner_teacher``, ``method.lambdas.<name>``).
        """
        configured = {name: spec.kind for name, spec in self.teachers.items()}
        method = method_class(self.method.name)
        try:
            return plan_teachers(method, self.method, configured)
        except ConfigError as exc:
            if exc.field is not None and exc.field.startswith("teachers"):
                raise
            raise exc.within("method") from None

    def validate(self) -> RunConfig:
        """Check every field; raise a :class:`ConfigError` naming the first bad one. Returns ``self``."""
        self.teacher_plan()
        for name, spec in [("student", self.student), *((f"teachers.{n}", t) for n, t in self.teachers.items())]:
            check_vision_alpha(spec.vision_weights_alpha, f"{name}.vision_weights_alpha")
        if self.eval.norm is not None:
            check_choice("eval.norm", self.eval.norm, NORMS)
        check_choice("student.finetune", self.student.finetune, FINETUNE_MODES)
        check_choice("train.precision", self.train.precision, TRAIN_PRECISIONS)
        check_choice("train.on_nonfinite", self.train.on_nonfinite, NONFINITE_POLICIES)
        _check_counts(self)
        _check_rates(self)
        if not self.output_dir.strip():
            raise ConfigError("output_dir: expected a folder for the run, got an empty path")
        _check_device_name(self.device)
        _check_dataset(self.data.dataset)
        _check_parts(self)
        _check_eval_attacks(self)
        _check_augment(self)
        return self


def _check_parts(cfg: RunConfig) -> None:
    """``data.part`` and ``data.eval_part`` are ``k/n`` (:func:`mmtard.data.parse_part`)."""
    for name, part in (("data.part", cfg.data.part), ("data.eval_part", cfg.data.eval_part)):
        if part is not None:
            try:
                parse_part(part)
            except ConfigError as exc:
                raise exc.renamed(name) from None


def _check_counts(cfg: RunConfig) -> None:
    """The whole-number fields (steps, sizes, intervals) and the seed."""
    for name, value, low in (
        ("train.steps", cfg.train.steps, 1),
        ("data.batch_size", cfg.data.batch_size, 1),
        ("data.workers", cfg.data.workers, 0),
        ("data.samples", cfg.data.samples, 1),
        ("data.eval_samples", cfg.data.eval_samples, 1),
        ("train.checkpoint_every", cfg.train.checkpoint_every, 0),
        ("train.log_every", cfg.train.log_every, 1),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints, 1),
        ("eval.every", cfg.eval.every, 0),
        ("eval.steps", cfg.eval.steps, 1),
        ("eval.batch_size", cfg.eval.batch_size, 1),
        ("student.lora.rank", cfg.student.lora.rank, 1),
    ):
        if value is not None:
            check_whole_number(name, value, low)
    check_whole_number("train.seed", cfg.train.seed, 0, MAX_TRAIN_SEED)


def _check_rates(cfg: RunConfig) -> None:
    """The real-valued fields: rates, scales, fractions and the optimizer's betas."""
    positive = {"low": 0, "low_open": True}
    fraction = {"low": 0, "high": 1, "high_open": True}
    check_number("train.lr", cfg.train.lr, **positive, expected="a positive learning rate")
    check_number("train.dist_timeout_s", cfg.train.dist_timeout_s, **positive, expected="a positive number of seconds")
    check_number("student.lora.alpha", cfg.student.lora.alpha, **positive, expected="a positive scale")
    if cfg.train.grad_clip is not None:
        expected = "a positive gradient norm (or null for none)"
        check_number("train.grad_clip", cfg.train.grad_clip, **positive, expected=expected)
    check_number("train.warmup", cfg.train.warmup, **fraction, expected="a fraction of the steps in [0, 1)")
    check_number("train.weight_decay", cfg.train.weight_decay, low=0, expected="a number >= 0")
    check_number("student.lora.dropout", cfg.student.lora.dropout, **fraction, expected="a probability in [0, 1)")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers [beta1, beta2], got {cfg.train.betas}")
    for i, beta in enumerate(cfg.train.betas):
        check_number(f"train.betas[{i}]", beta, **fraction, expected="a number in [0, 1)")


def _check_augment(cfg: RunConfig) -> None:
    """Random augmentation changes the image behind a dataset index every epoch; the clean-teacher cache
    keeps the teachers' logits of the first one it saw."""
    if cfg.data.augment and cfg.method.cache_clean_teacher:
        raise ConfigError(
            "data.augment: random augmentation changes each training image every epoch, so the teacher logits "
            "that method.cache_clean_teacher keeps per dataset index would be stale; set "
            "method.cache_clean_teacher=false or data.augment=false"
        )


def _check_device_name(device: str) -> None:
    """The device string parses (``auto``, ``cpu``, ``cuda``, ``cuda:1``...); whether it exists here is
    checked when the run starts (:func:`mmtard.distributed.check_device`)."""
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None


def _check_dataset(name: str) -> None:
    from mmtard.data import list_datasets

    if name not in list_datasets():
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; expected one of {', '.join(list_datasets())}")


def _check_eval_attacks(cfg: RunConfig) -> None:
    """``eval.attack`` / ``eval.eps`` / ``eval.steps`` build the held-out attacks (as the trainer will)."""
    from mmtard.attacks import list_attacks

    check_choice("eval.attack", cfg.eval.attack, list_attacks())
    try:
        build_eval_attacks(cfg)
    except ConfigError as exc:
        raise ConfigError(f"eval.attack: {exc}") from None


def build_eval_attacks(cfg: RunConfig) -> list:
    """The held-out evaluation's attacks: ``eval.attack`` at each radius of ``eval.eps``."""
    from mmtard.attacks import create_attack

    norm = cfg.eval.norm or cfg.method.norm
    return [
        create_attack(cfg.eval.attack, eps=eps, norm=norm, steps=cfg.eval.steps, seed=cfg.train.seed)
        for eps in cfg.eval.eps
    ]
