"""The zoo benchmark's cells, recipes and jobs: what a student is, how it trains, and one run of it.

A cell is a preset with its settings (``mmt-ard`` with ``rho: 9``...). A recipe is how a student trains (steps,
learning rate, PGD steps inside training, weight decay); the calibration grid chooses one in which the baselines
forget zero-shot accuracy as they do at scale (issue 16, BENCHMARKS.md). A job is a cell, a recipe and a seed: one
student, in ``<out>/student-<cell>-<recipe>-seed<seed>/``. ``benchmarks/zoo_benchmark.py`` runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmtard.methods import MethodConfig, method_config


@dataclass(frozen=True)
class Recipe:
    """How a student trains: ``steps`` optimizer steps of the benchmark's batch at peak learning rate ``lr``
    (AdamW, cosine schedule), PGD-``attack_steps`` at 4/255 inside training, ``weight_decay``."""

    name: str
    steps: int
    lr: float
    attack_steps: int = 2
    weight_decay: float = 1e-4

    def train(self) -> dict:
        """The ``train`` entry of a protocol variant (``mmtard.experiments.protocol_stages``)."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "attack_steps": self.attack_steps,
            "weight_decay": self.weight_decay,
        }


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("issue8", steps=200, lr=1e-4),  # issues 8 and 12: the baselines forget little (unseen clean 71)
        Recipe("lr1e-3", steps=200, lr=1e-3),  # issue 16's starting point (tecoa unseen clean 67 on 200 images)
        Recipe("lr2e-3", steps=200, lr=2e-3),
        Recipe("lr1e-3-400", steps=400, lr=1e-3),
        Recipe("lr2e-3-400", steps=400, lr=2e-3),
        Recipe("lr4e-3", steps=200, lr=4e-3),
        # issue 25's regime: a tenth of the calibrated learning rate and 4x its images seen (the paper trains at
        # 2e-5 for 5000 steps of 512: forgetting by many small steps instead of a large step size)
        Recipe("lr2e-4-800", steps=800, lr=2e-4),
        Recipe("smoke", steps=2, lr=1e-3),  # toy runs only (benchmarks/gpu_run.sh --tiny): checks the code path
    )
}
#: The recipe of the calibrated protocol: chosen by the calibration grid (BENCHMARKS.md section 2).
CALIBRATED = "lr2e-3"


@dataclass(frozen=True)
class Cell:
    """One kind of student: ``preset`` with ``settings`` (method overrides) and ``more_teachers`` (name -> kind,
    each trained once from the teacher foundation with the preset of its name).

    ``teacher_stages`` points a teacher at any stage of the protocol (``{"clean": "foundation-student"}``: the
    student's own foundation in the clean teacher's place), ``teacher_kinds`` gives the kind of a teacher it adds
    (``{"robust_clean": "clean"}``). ``finetune`` is how the student trains (``full``, or ``lora``: peft's LoRA
    adapters with the library's defaults, ``student.lora``). ``lr_scale`` multiplies the recipe's learning rate
    for this cell (LoRA adapters usually train at several times a full fine-tune's rate). ``control`` marks a cell
    that is a control of the benchmark, not a candidate (``self-anchor``)."""

    name: str
    preset: str
    settings: Mapping[str, object] = field(default_factory=dict)
    more_teachers: Mapping[str, str] = field(default_factory=dict)
    teacher_stages: Mapping[str, str] = field(default_factory=dict)
    teacher_kinds: Mapping[str, str] = field(default_factory=dict)
    finetune: str = "full"
    lr_scale: float = 1.0
    control: str | None = None

    def config(self) -> MethodConfig:
        """The method config (raises ConfigError for settings the preset refuses)."""
        return method_config(self.preset, **self.settings)

    def variant(self, recipe: Recipe) -> dict:
        """The protocol variant (``mmtard.experiments.run_protocol``) of this cell trained with ``recipe``."""
        train = recipe.train()
        train["lr"] *= self.lr_scale
        variant = {"method": self.preset, **self.settings, "train": train}
        for key in ("more_teachers", "teacher_stages", "teacher_kinds"):
            if getattr(self, key):
                variant[key] = dict(getattr(self, key))
        if self.finetune != "full":
            variant["finetune"] = self.finetune
        return variant


ARD_INNER = {"inner": "kl-robust-teacher"}  # ARD's adversarial examples: KL(P_R(x) || P_S(x + delta))
DIWREF = {"diw": "reference"}
FIXED91 = {"balance": "fixed", "lambda_robust": 0.9, "lambda_clean": 0.1}
#: issue 25's teacher swaps: the student's foundation as the clean teacher (a plain anchor: does the clean teacher
#: teach anything?), the teacher foundation as the clean teacher (more headroom), the robust teacher's weights as a
#: third teacher of kind clean (its clean-image knowledge, as RSLAD and AdaAD use it; every part of mmt-ard stays)
SELF_ANCHOR = {"teacher_stages": {"clean": "foundation-student"}, "control": "self-anchor"}
FOUNDATION_CLEAN = {"teacher_stages": {"clean": "foundation-teacher"}}
ROBUST_AS_CLEAN = {"teacher_stages": {"robust_clean": "teacher-robust"}, "teacher_kinds": {"robust_clean": "clean"}}
CELLS: dict[str, Cell] = {
    cell.name: cell
    for cell in (
        # Baselines.
        Cell("ard", "ard"),
        Cell("tecoa", "tecoa"),
        Cell("reference", "reference"),
        # mmt-ard, the seed's objective; measurement chooses among these settings (issue 16).
        Cell("mmt-ard", "mmt-ard"),  # the preset's defaults: cosine DIW, sigmoid balance, rho 1
        Cell("mmt-ard_rho9", "mmt-ard", {"rho": 9.0}),
        Cell("mmt-ard_gap", "mmt-ard", {"balance": "gap"}),
        Cell("mmt-ard_fixed", "mmt-ard", {"balance": "fixed"}),  # 1 / 1
        Cell("mmt-ard_fixed91", "mmt-ard", FIXED91),
        Cell("mmt-ard_diwref", "mmt-ard", DIWREF),
        # issue 25: the clean teacher swapped (controls and hypotheses 1, 3 and 4 of its step 4)
        Cell("mmt-ard_diwref_selfanchor", "mmt-ard", DIWREF, **SELF_ANCHOR),
        Cell("mmt-ard_fixed91_selfanchor", "mmt-ard", FIXED91, **SELF_ANCHOR),
        Cell("mmt-ard_diwref_ftclean", "mmt-ard", DIWREF, **FOUNDATION_CLEAN),
        Cell("mmt-ard_diwref_rclean", "mmt-ard", DIWREF, **ROBUST_AS_CLEAN),
        # issue 25's hypothesis 5: LoRA students (the authors' evaluated ViT-B-32 is one), the baseline alike
        Cell("ard_lora", "ard", finetune="lora"),
        Cell("mmt-ard_diwref_lora", "mmt-ard", DIWREF, finetune="lora"),
        # the same at 5x and 10x the recipe's learning rate: a LoRA student that reaches ard's robustness tests
        # hypothesis 5 at equal robustness (BENCHMARKS.md section 2, fourth pre-registration)
        Cell("ard_lora_lr5x", "ard", finetune="lora", lr_scale=5.0),
        Cell("ard_lora_lr10x", "ard", finetune="lora", lr_scale=10.0),
        Cell("mmt-ard_diwref_lora_lr10x", "mmt-ard", DIWREF, finetune="lora", lr_scale=10.0),
        Cell("mmt-ard_diwref_selfanchor_lora_lr10x", "mmt-ard", DIWREF, finetune="lora", lr_scale=10.0, **SELF_ANCHOR),
        Cell("mmt-ard_rho9_ardinner", "mmt-ard", {"rho": 9.0, **ARD_INNER}),
        Cell("mmt-ard_gap_ardinner", "mmt-ard", {"balance": "gap", **ARD_INNER}),
        Cell("mmt-ard_fixed_ardinner", "mmt-ard", {"balance": "fixed", **ARD_INNER}),
        Cell("mmt-ard_both", "mmt-ard", {"clean_input": "both"}),
        Cell("mmt-ard_fare", "mmt-ard", more_teachers={"fare": "robust"}),  # a second robust teacher (FARE)
        # Variants with names of their own: they drop a part of the method.
        Cell("mmt-ard-adv", "mmt-ard-adv"),
        Cell("ard_rslad", "ard", {"robust_target": "clean"}),
    )
}
#: Trained on every seed: the baselines and the variant beside mmt-ard's chosen settings.
BASELINES = ("ard", "tecoa", "reference", "mmt-ard-adv")
#: mmt-ard's settings measured on the first seed (issue 16: sigmoid rho 1 and 9, gap, fixed 1/1 and 0.9/0.1,
#: DIW cosine against reference), the candidates among them trained on every seed.
ABLATION = ("mmt-ard", "mmt-ard_rho9", "mmt-ard_gap", "mmt-ard_fixed", "mmt-ard_fixed91", "mmt-ard_diwref")
#: What the calibration grid trains with each recipe.
CALIBRATION = ("tecoa", "ard")


@dataclass(frozen=True)
class Job:
    """One student: ``cell`` trained with ``recipe`` from seed ``seed``."""

    cell: Cell
    recipe: Recipe
    seed: int

    @property
    def variant_name(self) -> str:
        return f"{self.cell.name}-{self.recipe.name}"

    @property
    def stage(self) -> str:
        """The student's folder under the benchmark's output."""
        return f"student-{self.variant_name}-seed{self.seed}"

    def variants(self) -> dict[str, dict]:
        return {self.variant_name: self.cell.variant(self.recipe)}


@dataclass(frozen=True)
class Frontier:
    """A control (issue 25): the student of ``job`` interpolated with the student foundation in the image tower's
    weight space, ``alpha * student + (1 - alpha) * foundation`` (WiSE-FT): the clean-versus-robust trade-off that
    costs nothing. A method adds something only where it lies above this line."""

    job: Job
    alpha: float

    @property
    def stage(self) -> str:
        return f"interp{self.alpha:g}-{self.job.variant_name}-seed{self.job.seed}"


def make_jobs(cells: Sequence[str], recipes: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """One job per cell, recipe and seed, in that order (cell-major).

    Raises:
        KeyError: an unknown cell or recipe name (callers check names first).
    """
    return [Job(CELLS[c], RECIPES[r], s) for c in cells for r in recipes for s in seeds]
