"""Every registered method against a hand computation of its loss (spec sections 2 and 3), on tiny
deterministic zero-shot classifiers; teacher freezing, forward counts, the clean-teacher cache, the
batch-norm path, config errors and state round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.attacks.functional import pgd
from mmtard.errors import ConfigError
from mmtard.methods import MethodConfig, create_method, list_methods, method_config
from mmtard.models.zeroshot import ZeroShotClassifier

TOL = 1e-5
B, K = 6, 4
SCALE = 10.0  # logit scale of the fakes: small enough that softmaxes are not saturated
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
EPS = 8 / 255
ATTACK_STEPS = 3
PRESETS = ["mmt-ard", "mmt-ard-adv", "reference", "ard", "tecoa", "fare", "pmg-aft", "clean-ft"]
TWO_TEACHER_METRICS = {
    "L_R",
    "L_C",
    "lambda_R",
    "lambda_C",
    "robust_teacher_score",
    "clean_teacher_score",
    "acc_clean",
    "acc_adv",
    "shortfall_R",
    "shortfall_C",
}
EXPECTED_METRICS = {
    "mmt-ard": TWO_TEACHER_METRICS,
    "mmt-ard-adv": TWO_TEACHER_METRICS - {"acc_clean"},  # clean_input: adversarial runs no clean student forward
    "reference": TWO_TEACHER_METRICS,
    "ard": {"L_R", "lambda_R", "robust_teacher_score", "shortfall_R", "acc_adv"},
    "tecoa": {"ce", "acc_adv"},
    "fare": {"fare"},
    "pmg-aft": {"ce", "kl_original", "kl_clean_adv", "acc_clean", "acc_adv"},
    "clean-ft": {"ce", "acc_clean"},
}
# Teacher tower forwards per step when attacking (a forward computed and not used would show here).
EXPECTED_TEACHER_FORWARDS = {
    "mmt-ard": {"clean": 1, "robust": 1, "original": 0},
    "mmt-ard-adv": {"clean": 1, "robust": 1, "original": 0},
    "reference": {"clean": 1, "robust": 1, "original": 0},
    "ard": {"clean": 0, "robust": 2, "original": 0},
    "tecoa": {"clean": 0, "robust": 0, "original": 0},
    "fare": {"clean": 0, "robust": 0, "original": 1},
    "pmg-aft": {"clean": 0, "robust": 0, "original": 1},
    "clean-ft": {"clean": 0, "robust": 0, "original": 0},
}


def fake_classifier(seed: int, dim: int, batch_norm: bool = False) -> ZeroShotClassifier:
    """A zero-shot classifier whose tower is a seeded linear map of the flattened 3x4x4 image."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(48, dim)] + ([nn.BatchNorm1d(dim)] if batch_norm else [])
    prototypes = F.normalize(torch.randn(K, dim), dim=-1)
    return ZeroShotClassifier(nn.Sequential(*layers), MEAN, STD, prototypes, SCALE).train()


def make_teachers() -> dict[str, ZeroShotClassifier]:
    # Different embedding sizes: knowledge passes through class distributions only.
    return {"clean": fake_classifier(1, 7), "robust": fake_classifier(2, 5), "original": fake_classifier(3, 6)}


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(B, 3, 4, 4, generator=g), torch.randint(0, K, (B,), generator=g)


# ---------------------------------------------------------------- hand computations, written from the spec


def hand_features(model: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return model.visual((x - mean) / std)


def hand_cos(model: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
    """(B, K) cosines between e(x) and every prototype."""
    f = hand_features(model, x)
    return (f / f.norm(dim=1, keepdim=True)) @ model.prototypes.T


def hand_logits(model: ZeroShotClassifier, x: torch.Tensor) -> torch.Tensor:
    return SCALE * hand_cos(model, x)


def hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    p, q = torch.softmax(p_logits / tau, dim=1), torch.softmax(q_logits / tau, dim=1)
    return (p * (p.log() - q.log())).sum(dim=1)


def hand_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(y)), y]


def hand_x_adv(preset: str, student, teachers, x, y, steps: int) -> torch.Tensor:
    """The expected ``x'``: PGD (same seed) on the inner objective written by hand."""
    if steps == 0 or preset == "clean-ft":
        return x
    alpha = 1 / 255 if preset == "reference" else EPS / 4
    with torch.no_grad():
        clean_target = hand_logits(teachers["clean"], x)
        robust_target = hand_logits(teachers["robust"], x)
        original_features = hand_features(teachers["original"], x)
    objectives = {
        "mmt-ard": lambda xa: hand_kl(clean_target, hand_logits(student, xa)),
        "mmt-ard-adv": lambda xa: hand_kl(clean_target, hand_logits(student, xa)),
        "reference": lambda xa: hand_kl(clean_target, hand_logits(student, xa)),
        "ard": lambda xa: hand_kl(robust_target, hand_logits(student, xa)),
        "tecoa": lambda xa: hand_ce(hand_logits(student, xa), y),
        "pmg-aft": lambda xa: hand_ce(hand_logits(student, xa), y),
        "fare": lambda xa: ((hand_features(student, xa) - original_features) ** 2).sum(dim=1),
    }
    torch.manual_seed(0)
    return pgd(objectives[preset], x, eps=EPS, alpha=alpha, steps=steps)


def weighted_term(kl: torch.Tensor, cos_true: torch.Tensor, diw: str, reference_scale: float) -> torch.Tensor:
    if diw == "cosine":
        a = cos_true.clamp(min=0)
        a = a / a.mean()
    else:  # reference
        a = reference_scale * cos_true
    return (a * kl).mean()


def hand_loss(preset: str, student, teachers, x, y, x_adv) -> torch.Tensor:
    """The expected step loss given ``x'`` (first step of the balance)."""
    with torch.no_grad():
        s_clean, s_adv = hand_logits(student, x), hand_logits(student, x_adv)
        rows = torch.arange(len(y))
        if preset in ("mmt-ard", "mmt-ard-adv", "reference"):
            diw = "reference" if preset == "reference" else "cosine"
            cos_r = hand_cos(teachers["robust"], x_adv)[rows, y]
            cos_c = hand_cos(teachers["clean"], x)[rows, y]
            l_r = weighted_term(hand_kl(hand_logits(teachers["robust"], x_adv), s_adv), cos_r, diw, 50.0)
            s_for_clean = s_adv if preset == "mmt-ard-adv" else s_clean  # the preset's clean_input: adversarial
            l_c = weighted_term(hand_kl(hand_logits(teachers["clean"], x), s_for_clean), cos_c, diw, 5.0)
            if preset == "reference":
                return l_r + l_c
            lambda_r = 1 / (1 + math.exp(-5.0 * (l_r - l_c) / (l_r + l_c)))  # EMA = first values
            return lambda_r * l_r + (1 - lambda_r) * l_c
        if preset == "ard":
            return hand_kl(hand_logits(teachers["robust"], x_adv), s_adv).mean()
        if preset == "tecoa":
            return hand_ce(s_adv, y).mean()
        if preset == "fare":
            f_o = hand_features(teachers["original"], x)
            return ((hand_features(student, x_adv) - f_o) ** 2).sum(dim=1).mean()
        if preset == "pmg-aft":
            kl_o = hand_kl(hand_logits(teachers["original"], x_adv), s_adv).mean()
            return hand_ce(s_adv, y).mean() + kl_o + hand_kl(s_clean, s_adv).mean()
        return hand_ce(s_clean, y).mean()  # clean-ft


def run_method(preset: str, steps: int = ATTACK_STEPS, student=None, teachers=None, **overrides):
    student = student if student is not None else fake_classifier(0, 6)
    teachers = teachers if teachers is not None else make_teachers()
    x, y = make_batch()
    method = create_method(method_config(preset, eps=EPS, steps=steps, **overrides))
    torch.manual_seed(0)
    return method.use_teachers(teachers)(student, x, y), method, student, teachers, x, y


# ---------------------------------------------------------------- losses per preset


def test_registry_lists_every_preset():
    assert list_methods() == sorted(PRESETS)


@pytest.mark.parametrize("steps", [0, ATTACK_STEPS], ids=["no-attack", "attack"])
@pytest.mark.parametrize("preset", PRESETS)
def test_loss_matches_hand_computation(preset, steps):
    out, _, student, teachers, x, y = run_method(preset, steps)
    expected_x_adv = hand_x_adv(preset, student, teachers, x, y, steps)
    assert torch.allclose(out.x_adv, expected_x_adv, atol=1e-6)
    if steps and preset != "clean-ft":
        assert (out.x_adv - x).abs().max() > 0.5 * EPS
        assert (out.x_adv - x).abs().max() <= EPS + 1e-6
    expected = hand_loss(preset, student, teachers, x, y, out.x_adv)
    assert abs(out.total().item() - float(expected)) < TOL
    assert set(out.metrics) == EXPECTED_METRICS[preset]
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_mmt_ard_metrics_are_the_raw_terms_and_scores():
    out, _, student, teachers, x, y = run_method("mmt-ard", clean_input="clean", steps=0)
    rows = torch.arange(B)
    with torch.no_grad():
        s = hand_logits(student, x)
        cos_r = hand_cos(teachers["robust"], x)[rows, y]
        cos_c = hand_cos(teachers["clean"], x)[rows, y]
        l_r = weighted_term(hand_kl(hand_logits(teachers["robust"], x), s), cos_r, "cosine", 0)
        l_c = weighted_term(hand_kl(hand_logits(teachers["clean"], x), s), cos_c, "cosine", 0)
    m = out.metrics
    assert abs(m["L_R"] - l_r.item()) < TOL and abs(m["L_C"] - l_c.item()) < TOL
    assert abs(m["robust_teacher_score"] - cos_r.mean().item()) < TOL
    assert abs(m["clean_teacher_score"] - cos_c.mean().item()) < TOL
    assert abs(m["lambda_R"] + m["lambda_C"] - 1) < TOL
    assert abs(out.losses["robust"].item() - m["lambda_R"] * m["L_R"]) < TOL
    assert abs(m["acc_clean"] - 100 * (s.argmax(1) == y).float().mean().item()) < TOL


def test_confidence_diw_score_is_true_class_probability():
    out, _, _, teachers, x, y = run_method(
        "mmt-ard", clean_input="clean", steps=0, diw="confidence", diw_temperature=2.0
    )
    with torch.no_grad():
        prob = torch.softmax(hand_logits(teachers["clean"], x) / 2.0, dim=1)[torch.arange(B), y]
    assert abs(out.metrics["clean_teacher_score"] - prob.mean().item()) < TOL


def hand_shortfall(teacher_logits: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor) -> float:
    t = (teacher_logits.argmax(1) == y).float().mean().item()
    s = (student_logits.argmax(1) == y).float().mean().item()
    return max(t - s, 0.0) / t if t > 0 else 0.0


@pytest.mark.parametrize("inner", ["kl-clean-teacher", "kl-robust-teacher"])
def test_robust_target_clean_distils_the_robust_teacher_on_clean_images(inner):
    """RSLAD's target: l_R,i = KL(P_R(x_i) || P_S(x'_i)); DIW reads the robust teacher on x."""
    out, _, student, teachers, x, y = run_method("mmt-ard", clean_input="clean", robust_target="clean", inner=inner)
    rows = torch.arange(B)
    with torch.no_grad():
        target = hand_logits(teachers["clean" if inner == "kl-clean-teacher" else "robust"], x)
    torch.manual_seed(0)
    expected_x_adv = pgd(lambda xa: hand_kl(target, hand_logits(student, xa)), x, eps=EPS, alpha=EPS / 4, steps=3)
    assert torch.allclose(out.x_adv, expected_x_adv, atol=1e-6)
    with torch.no_grad():
        s_clean, s_adv = hand_logits(student, x), hand_logits(student, out.x_adv)
        robust_clean = hand_logits(teachers["robust"], x)
        l_r = weighted_term(hand_kl(robust_clean, s_adv), hand_cos(teachers["robust"], x)[rows, y], "cosine", 0)
        clean_logits = hand_logits(teachers["clean"], x)
        l_c = weighted_term(hand_kl(clean_logits, s_clean), hand_cos(teachers["clean"], x)[rows, y], "cosine", 0)
        lambda_r = 1 / (1 + math.exp(-5.0 * (l_r - l_c) / (l_r + l_c)))
    assert abs(out.total().item() - (lambda_r * l_r + (1 - lambda_r) * l_c).item()) < TOL
    assert abs(out.metrics["shortfall_R"] - hand_shortfall(robust_clean, s_adv, y)) < TOL


@pytest.mark.parametrize("robust_target", ["adversarial", "clean"])
def test_clean_input_adversarial_distils_the_clean_teacher_into_the_adversarial_output(robust_target):
    """clean_input: adversarial: l_C,i = KL(P_C(x_i) || P_S(x'_i)), and no clean student forward."""
    overrides = dict(diw="none", balance="fixed", lambda_robust=1.0, lambda_clean=0.5, robust_target=robust_target)
    out, _, student, teachers, x, y = run_method("mmt-ard-adv", **overrides)
    with torch.no_grad():
        s_adv = hand_logits(student, out.x_adv)
        robust = hand_logits(teachers["robust"], x if robust_target == "clean" else out.x_adv)
        l_r = hand_kl(robust, s_adv).mean()
        l_c = hand_kl(hand_logits(teachers["clean"], x), s_adv).mean()
    assert abs(out.total().item() - (l_r + 0.5 * l_c).item()) < TOL
    assert abs(out.metrics["L_C"] - l_c.item()) < TOL
    assert "acc_clean" not in out.metrics  # the clean student output is never computed


def test_clean_input_both_averages_the_clean_teachers_kl_over_the_clean_and_adversarial_outputs():
    overrides = dict(diw="none", balance="fixed", lambda_robust=1.0, lambda_clean=0.5)
    out, _, student, teachers, x, y = run_method("mmt-ard", clean_input="both", **overrides)
    with torch.no_grad():
        s_clean, s_adv = hand_logits(student, x), hand_logits(student, out.x_adv)
        clean_logits = hand_logits(teachers["clean"], x)
        l_r = hand_kl(hand_logits(teachers["robust"], out.x_adv), s_adv).mean()
        l_c = ((hand_kl(clean_logits, s_clean) + hand_kl(clean_logits, s_adv)) / 2).mean()
    assert abs(out.total().item() - (l_r + 0.5 * l_c).item()) < TOL
    assert abs(out.metrics["L_C"] - l_c.item()) < TOL and "acc_clean" in out.metrics


def test_clean_input_is_checked():
    with pytest.raises(ConfigError, match="clean_input"):
        method_config("mmt-ard", clean_input="x_adv")


def test_ard_with_the_clean_target_is_rslad():
    out, _, student, teachers, x, y = run_method("ard", robust_target="clean")
    with torch.no_grad():
        expected = hand_kl(hand_logits(teachers["robust"], x), hand_logits(student, out.x_adv)).mean()
    assert abs(out.total().item() - expected.item()) < TOL


@pytest.mark.parametrize("rho", [1.0, 9.0])
def test_gap_balance_weights_the_first_step_by_the_accuracy_shortfalls(rho):
    """lambda_R = sigmoid(beta * (s_R - s_C) + log rho) at the first step (EMA = first values)."""
    out, _, student, teachers, x, y = run_method(
        "mmt-ard", clean_input="clean", balance="gap", rho=rho, diw="none", beta=3.0
    )
    with torch.no_grad():
        s_clean, s_adv = hand_logits(student, x), hand_logits(student, out.x_adv)
        robust_adv, clean_logits = hand_logits(teachers["robust"], out.x_adv), hand_logits(teachers["clean"], x)
        s_r, s_c = hand_shortfall(robust_adv, s_adv, y), hand_shortfall(clean_logits, s_clean, y)
        l_r, l_c = hand_kl(robust_adv, s_adv).mean(), hand_kl(clean_logits, s_clean).mean()
    lambda_r = 1 / (1 + math.exp(-(3.0 * (s_r - s_c) + math.log(rho))))
    assert abs(out.metrics["shortfall_R"] - s_r) < TOL and abs(out.metrics["shortfall_C"] - s_c) < TOL
    assert abs(out.metrics["lambda_R"] - lambda_r) < TOL
    assert abs(out.total().item() - (lambda_r * l_r + (1 - lambda_r) * l_c).item()) < TOL


def test_sigmoid_with_a_robust_prior_at_the_first_step():
    out, *_ = run_method("mmt-ard", rho=9.0)
    m = out.metrics
    expected = 1 / (1 + math.exp(-(5.0 * (m["L_R"] - m["L_C"]) / (m["L_R"] + m["L_C"]) + math.log(9.0))))
    assert abs(m["lambda_R"] - expected) < TOL


# ---------------------------------------------------------------- teachers frozen, forwards counted


@pytest.mark.parametrize("preset", PRESETS)
def test_teachers_get_no_gradient_and_do_not_change(preset):
    student, teachers = fake_classifier(0, 6), make_teachers()
    before = {role: copy.deepcopy(t.state_dict()) for role, t in teachers.items()}
    out, _, student, teachers, _, _ = run_method(preset, student=student, teachers=teachers)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    out.total().backward()
    optimizer.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for role, teacher in teachers.items():
        assert all(p.grad is None for p in teacher.parameters())
        for name, value in teacher.state_dict().items():
            assert torch.equal(value, before[role][name])


def count_forwards(model: nn.Module, log: list) -> None:
    model.register_forward_hook(lambda module, inputs, output: log.append((inputs[0].shape[0], module.training)))


@pytest.mark.parametrize("preset", PRESETS)
def test_teacher_forward_counts(preset):
    teachers = make_teachers()
    logs = {role: [] for role in teachers}
    for role, teacher in teachers.items():
        count_forwards(teacher.visual, logs[role])
    run_method(preset, teachers=teachers)
    assert {role: len(log) for role, log in logs.items()} == EXPECTED_TEACHER_FORWARDS[preset]
    assert all(size == B and not training for log in logs.values() for size, training in log)


@pytest.mark.parametrize(
    "preset,overrides,expected",
    [
        ("mmt-ard", {"robust_target": "clean"}, {"clean": 1, "robust": 1, "original": 0}),
        ("mmt-ard", {"robust_target": "clean", "inner": "kl-robust-teacher"}, {"clean": 1, "robust": 1, "original": 0}),
        ("mmt-ard", {"inner": "kl-robust-teacher"}, {"clean": 1, "robust": 2, "original": 0}),
        ("ard", {"robust_target": "clean"}, {"clean": 0, "robust": 1, "original": 0}),
    ],
)
def test_teacher_forward_counts_of_the_robust_target(preset, overrides, expected):
    """P_R(x) is computed once per step whether the inner objective, the robust term or both use it."""
    teachers = make_teachers()
    logs = {role: [] for role in teachers}
    for role, teacher in teachers.items():
        count_forwards(teacher.visual, logs[role])
    run_method(preset, teachers=teachers, **overrides)
    assert {role: len(log) for role, log in logs.items()} == expected


def test_robust_teacher_cache_serves_the_clean_target():
    teachers = make_teachers()
    log = []
    count_forwards(teachers["robust"].visual, log)
    cfg = method_config("mmt-ard", eps=EPS, steps=ATTACK_STEPS, robust_target="clean", cache_clean_teacher=True)
    method = create_method(cfg)
    x, y = make_batch()
    index = torch.arange(B)
    method.use_teachers(teachers)
    method(fake_classifier(0, 6), x, y, index)
    method(fake_classifier(0, 6), x, y, index)
    assert len(log) == 1


def test_ard_without_attack_runs_the_robust_teacher_once():
    teachers = make_teachers()
    log = []
    count_forwards(teachers["robust"].visual, log)
    run_method("ard", steps=0, teachers=teachers)
    assert len(log) == 1


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: ``.module`` and a counted forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("preset", PRESETS)
def test_wrapped_student_is_called_once_and_attacked_unwrapped_in_eval_mode(preset):
    inner = fake_classifier(0, 6)
    log = []
    count_forwards(inner.visual, log)
    wrapped = Wrapper(inner)
    out, *_ = run_method(preset, student=wrapped)
    assert wrapped.calls == 1  # clean and adversarial images in one concatenated training forward
    attacked = preset != "clean-ft"
    # pgd's forwards (eval mode), then the training forward (train mode)
    assert [training for _, training in log] == [False] * (ATTACK_STEPS if attacked else 0) + [True]
    assert inner.training and inner.visual.training
    assert torch.isfinite(out.total())


# ---------------------------------------------------------------- clean-teacher cache


def test_clean_teacher_cache_skips_the_forward_and_gives_the_same_loss():
    teachers = make_teachers()
    log = []
    count_forwards(teachers["clean"].visual, log)
    student = fake_classifier(0, 6)
    method = create_method(method_config("mmt-ard", eps=EPS, steps=ATTACK_STEPS, cache_clean_teacher=True))
    x, y = make_batch()
    index = torch.arange(10, 10 + B)
    state = method.state_dict()
    torch.manual_seed(0)
    first = method.use_teachers(teachers)(student, x, y, index)
    assert len(log) == 1
    method.load_state_dict(state)  # same balance state, so the same loss is expected
    torch.manual_seed(0)
    second = method(student, x, y, index)
    assert len(log) == 1
    assert abs(first.total().item() - second.total().item()) < TOL
    new_index = index.clone()
    new_index[0] = 99
    method(student, x, y, new_index)
    assert [size for size, _ in log] == [B, 1]  # only the unseen row is forwarded
    method(student, x, y)  # no index: no cache
    assert len(log) == 3


# ---------------------------------------------------------------- batch norm


def test_batch_norm_student_uses_separate_forwards():
    student = fake_classifier(0, 6, batch_norm=True)
    reference = copy.deepcopy(student)
    out, _, _, teachers, x, y = run_method("pmg-aft", student=student)
    assert student.training
    s_clean, s_adv = reference(x), reference(out.x_adv)
    with torch.no_grad():
        expected = (
            F.cross_entropy(s_adv, y)
            + hand_kl(teachers["original"](out.x_adv), s_adv).mean()
            + hand_kl(s_clean, s_adv).mean()
        )
        joint = copy.deepcopy(reference)(torch.cat([x, out.x_adv]))
        concatenated = (
            F.cross_entropy(joint[B:], y)
            + hand_kl(teachers["original"](out.x_adv), joint[B:]).mean()
            + hand_kl(joint[:B], joint[B:]).mean()
        )
    assert abs(out.total().item() - expected.item()) < TOL
    assert abs(concatenated.item() - expected.item()) > 1e-3  # the path matters


def test_batch_norm_student_mmt_ard():
    student = fake_classifier(0, 6, batch_norm=True)
    reference = copy.deepcopy(student)
    out, _, _, teachers, x, y = run_method("mmt-ard", clean_input="clean", student=student, diw="none", balance="fixed")
    with torch.no_grad():
        expected = (
            hand_kl(teachers["robust"](out.x_adv), reference(out.x_adv)).mean()
            + hand_kl(teachers["clean"](x), reference(x)).mean()
        )
    assert abs(out.total().item() - expected.item()) < TOL


# ---------------------------------------------------------------- config and registry errors


def test_create_method_rejects_unknown_name():
    with pytest.raises(ConfigError, match="mmt-ard"):
        create_method(MethodConfig(name="mmt-ard-v2"))
    with pytest.raises(ConfigError, match="unknown method"):
        create_method("trades")


@pytest.mark.parametrize(
    "field,value",
    [("diw", "entropy"), ("balance", "softmax"), ("inner", "kl"), ("norm", "l1"), ("robust_target", "teacher")],
)
def test_validate_rejects_bad_choice(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        MethodConfig(**{field: value}).validate()
    assert "expected one of" in str(info.value)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 0.0), ("ema_momentum", 1.0), ("steps", -1), ("eps", 2.0), ("logit_scale", "x"), ("rho", 0.0)],
)
def test_validate_rejects_bad_number(field, value):
    with pytest.raises(ConfigError, match=field):
        MethodConfig(**{field: value}).validate()


def test_method_config_presets_and_errors():
    assert method_config("mmt-ard") == MethodConfig()  # the seed's objective with the spec's defaults
    assert method_config("mmt-ard-adv") == MethodConfig(name="mmt-ard-adv", clean_input="adversarial")
    reference = method_config("reference")
    assert (reference.diw, reference.balance) == ("reference", "fixed")
    assert (reference.lambda_robust, reference.lambda_clean) == (1.0, 1.0)
    assert abs(reference.step_size - 1 / 255) < 1e-12
    assert abs(MethodConfig().step_size - 1 / 255) < 1e-12  # eps/4 with eps = 4/255
    assert method_config("clean-ft").steps == 0
    assert MethodConfig(eps="2/255").eps == 2 / 255
    with pytest.raises(ConfigError, match="unknown field"):
        method_config("mmt-ard", lamda_robust=1.0)
    with pytest.raises(ConfigError, match="inner"):
        create_method(method_config("ard", inner="kl-clean-teacher"))  # ard has no clean teacher
    with pytest.raises(ConfigError, match="inner"):
        create_method(method_config("tecoa", inner="fare"))


@pytest.mark.parametrize("balance", ["fixed", "mtard"])
def test_a_robust_prior_needs_a_softmax_balance(balance):
    with pytest.raises(ConfigError, match="rho"):
        method_config("mmt-ard", balance=balance, rho=9.0)


def test_missing_teacher_role_is_an_error():
    x, y = make_batch()
    with pytest.raises(ConfigError, match="robust"):
        create_method("mmt-ard").use_teachers({"clean": fake_classifier(1, 7)})(fake_classifier(0, 6), x, y)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("balance", ["sigmoid", "ratio", "gap", "mtard"])
def test_state_dict_round_trip_gives_identical_lambdas(balance):
    student, teachers = fake_classifier(0, 6), make_teachers()
    cfg = method_config("mmt-ard", steps=0, balance=balance)
    first = create_method(cfg)
    for seed in range(3):
        first.use_teachers(teachers)(student, *make_batch(seed))
    second = create_method(cfg)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    a, b = first(student, *make_batch(5)), second.use_teachers(teachers)(student, *make_batch(5))
    assert a.metrics["lambda_R"] == b.metrics["lambda_R"]
    assert a.total().item() == b.total().item()
    assert first.state_dict() == second.state_dict()


# ---------------------------------------------------------------- real tiny CLIP towers


def test_tiny_vit_student_with_larger_teacher():
    from mmtard.models import build_zero_shot_classifier, load_clip

    classes, templates = ["cat", "dog", "car"], ["a photo of a {}."]
    torch.manual_seed(0)
    student = build_zero_shot_classifier(load_clip("tiny-vit-s", "none"), classes, templates).train()
    teacher_bundle = load_clip("tiny-vit-m", "none")
    teachers = {
        "clean": build_zero_shot_classifier(teacher_bundle, classes, templates),
        "robust": build_zero_shot_classifier(teacher_bundle, classes, templates),
    }
    assert student.prototypes.shape[1] != teachers["clean"].prototypes.shape[1]
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    out = create_method(method_config("mmt-ard", steps=1, clean_input="clean")).use_teachers(teachers)(student, x, y)
    loss = out.total()
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher_bundle.model.parameters())


@pytest.mark.parametrize(
    ("preset", "clean_input", "instead"),
    [
        ("mmt-ard", "adversarial", "mmt-ard-adv"),
        ("mmt-ard-adv", "clean", "mmt-ard"),
        ("mmt-ard-adv", "both", "mmt-ard"),
    ],
)
def test_a_preset_name_refuses_a_setting_that_leaves_its_objective(preset, clean_input, instead):
    """The name belongs to the objective: mmt-ard keeps its term on P_S(x), mmt-ard-adv its term on P_S(x')."""
    with pytest.raises(ConfigError, match=rf"clean_input: the '{preset}' preset .* preset {instead}$"):
        method_config(preset, clean_input=clean_input)
    assert method_config("mmt-ard", clean_input="both").clean_input == "both"


@pytest.mark.parametrize(("preset", "clean_output_gets_gradient"), [("mmt-ard", True), ("mmt-ard-adv", False)])
def test_mmt_ard_has_a_loss_term_on_the_students_clean_output(preset, clean_output_gets_gradient):
    """Gradient probe: the loss's gradient with respect to the student's clean logits P_S(x) is non-zero for
    mmt-ard (the clean teacher's term), and absent for mmt-ard-adv (which distils into P_S(x') only)."""
    student, teachers = fake_classifier(0, 6), make_teachers()
    x, y = make_batch()
    clean_logits = []

    def keep_clean_logits(module, inputs, output):
        images = inputs[0]
        if len(images) >= len(x) and torch.equal(images[: len(x)], x):  # a forward on x (or on cat([x, x']))
            output.retain_grad()
            clean_logits.append(output)

    handle = student.register_forward_hook(keep_clean_logits)
    try:
        out = create_method(method_config(preset, eps=EPS, steps=1)).use_teachers(teachers)(student, x, y)
    finally:
        handle.remove()
    out.total().backward()
    grads = [logits.grad[: len(x)] for logits in clean_logits if logits.grad is not None]
    if clean_output_gets_gradient:
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    else:
        assert not grads
