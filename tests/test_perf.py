"""FLOP counts, phase attribution and MFU arithmetic (``mmtard.perf``) against hand counts on tiny
models, and the GPU, aa and loader benchmarks at toy scale on a CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmtard.errors import ConfigError
from mmtard.methods import create_method, freeze, method_config
from mmtard.models import build_zero_shot_classifier, load_clip
from mmtard.perf import (
    PHASES,
    count_flops,
    count_step_flops,
    flop_counter,
    measure_matmul_tflops,
    mfu,
    time_step,
)
from mmtard.train.config import OptimConfig, RunConfig
from mmtard.train.trainer import TrainState, build_optimizer, train_step

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer"]
TEMPLATES = ["a photo of a {}."]
BATCH = 2
#: Teacher forwards per step: MMT-ARD's clean teacher on x and robust teacher on x'; ARD's robust teacher
#: on x (the inner target) and on x'; TeCoA has none.
TEACHER_FORWARDS = {"mmt-ard": 2, "ard": 2, "tecoa": 0}
# Images through the student's update: mmt-ard's student sees x and x'.
STUDENT_UPDATE_IMAGES = {"mmt-ard": 2 * BATCH, "ard": BATCH, "tecoa": BATCH}


@pytest.fixture
def load_script(monkeypatch):
    """Import a script of ``benchmarks/`` as a module (registered while the test runs: dataclasses need it)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    student = load_clip("tiny-vit-s", "none")
    student.model.requires_grad_(False)
    student.model.visual.requires_grad_(True)
    teachers = {}
    for role in ("clean", "robust"):
        bundle = load_clip("tiny-vit-s", "none")
        freeze(bundle.model)
        teachers[role] = build_zero_shot_classifier(bundle, CLASSNAMES, TEMPLATES)
    return student, teachers


def make_step(models, method_name: str, pgd_steps: int):
    """A student classifier, method and ``run()`` doing one ``train_step`` on a fixed batch of ``BATCH``."""
    bundle, all_teachers = models
    student = build_zero_shot_classifier(bundle, CLASSNAMES, TEMPLATES).train()
    params = [p for p in student.parameters() if p.requires_grad]
    run_config = RunConfig(train=OptimConfig(steps=10, grad_clip=1.0))
    optimizer, scheduler = build_optimizer(run_config, params)
    method = create_method(method_config(method_name, eps=4 / 255, steps=pgd_steps))
    state = TrainState(0, student, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), method)
    teachers = method.use_teachers(all_teachers).teachers
    x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3])

    def run():
        return train_step(state, (x, y, None), precision=None, optim=run_config.train)

    return run, method, teachers, student, x


def test_linear_layer_flops_are_a_hand_count():
    layer = nn.Linear(7, 5)
    x = torch.randn(3, 7, requires_grad=True)
    forward = 2 * 3 * 7 * 5  # a multiply-add per (sample, input, output) is 2 FLOPs
    assert count_flops(lambda: layer(x)) == forward
    # backward: the gradient of the input and of the weight, one product of the forward's size each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_matrix_product_flops_are_2n_cubed():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    assert count_flops(lambda: a @ b) == 2 * 16**3


def test_fused_attention_kernels_are_counted_as_the_unfused_products():
    batch, length, width, heads = 2, 5, 16, 4
    attention = nn.MultiheadAttention(width, heads, batch_first=True)
    x = torch.randn(batch, length, width)
    # q, k, v and output projections (4 L E^2 multiply-adds per sample), Q K^T and A V (2 L^2 E)
    hand = 2 * batch * (4 * length * width**2 + 2 * length**2 * width)

    attention.eval()
    with torch.no_grad(), flop_counter() as counter:  # eval without gradients: the fused inference kernel
        attention(x, x, x, need_weights=False)
    assert set(map(str, counter.get_flop_counts()["Global"])) == {"aten._native_multi_head_attention"}
    assert counter.get_total_flops() == hand

    attention.train()
    x_grad = x.clone().requires_grad_(True)
    with flop_counter() as counter:  # with gradients: projections + PyTorch's CPU flash attention
        attention(x_grad, x_grad, x_grad, need_weights=False)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in map(str, counter.get_flop_counts()["Global"])
    assert counter.get_total_flops() == hand

    # backward: each projection twice (input and weight gradients); attention recomputes Q K^T and runs
    # four products of its size (the gradients of the scores, V, Q and K)
    backward = 2 * batch * (2 * 4 * length * width**2 + 5 * length**2 * width)
    total = count_flops(lambda: attention(x_grad, x_grad, x_grad, need_weights=False)[0].sum().backward())
    assert total == hand + backward


def _student_input_gradient_flops(student: nn.Module, x: torch.Tensor) -> int:
    """One PGD iteration's counted work: a student forward in eval mode and the gradient of the input."""
    student.eval()
    delta = torch.zeros_like(x, requires_grad=True)  # as PGD: the model sees x + delta, not a leaf
    flops = count_flops(lambda: torch.autograd.grad(student(x + delta).sum(), delta))
    student.train()
    return flops


def _student_update_flops(student: nn.Module, x: torch.Tensor, images: int) -> int:
    """The student's training forward on ``images`` images and the backward to its weights."""
    batch = x.repeat(images // len(x), 1, 1, 1)
    flops = count_flops(lambda: student(batch).sum().backward())
    student.zero_grad(set_to_none=True)
    return flops


@pytest.mark.parametrize("method_name", ["mmt-ard", "ard", "tecoa"])
def test_step_flops_split_into_attack_teachers_and_update_by_hand_counts(models, method_name):
    run, method, teachers, student, x = make_step(models, method_name, pgd_steps=1)
    flops = count_step_flops(run, method, teachers)

    teacher_forward = count_flops(lambda: models[1]["robust"](x)) if teachers else 0
    assert flops["attack"] == _student_input_gradient_flops(student, x)
    assert flops["teachers"] == TEACHER_FORWARDS[method_name] * teacher_forward
    assert flops["student_update"] == _student_update_flops(student, x, STUDENT_UPDATE_IMAGES[method_name])
    assert flops["total"] == sum(flops[phase] for phase in PHASES)
    assert flops["attack"] > 0 and flops["student_update"] > 0


@pytest.mark.parametrize("method_name", ["mmt-ard", "tecoa"])
def test_each_pgd_step_adds_one_student_forward_and_input_gradient(models, method_name):
    counts = {}
    for steps in (1, 2, 3):
        run, method, teachers, student, x = make_step(models, method_name, pgd_steps=steps)
        counts[steps] = count_step_flops(run, method, teachers)
    one_iteration = _student_input_gradient_flops(student, x)
    for k in (1, 2):
        assert counts[k + 1]["total"] - counts[k]["total"] == one_iteration
        assert counts[k + 1]["attack"] - counts[k]["attack"] == one_iteration
        assert counts[k + 1]["teachers"] == counts[k]["teachers"]
        assert counts[k + 1]["student_update"] == counts[k]["student_update"]


def test_flops_scale_with_the_batch(models):
    bundle, teachers = models
    student = build_zero_shot_classifier(bundle, CLASSNAMES, TEMPLATES)
    x = torch.rand(4, 3, 32, 32)
    assert count_flops(lambda: student(x)) == 2 * count_flops(lambda: student(x[:2]))
    assert count_flops(lambda: teachers["clean"](x)) == 4 * count_flops(lambda: teachers["clean"](x[:1]))


def test_phases_leave_the_method_and_teachers_as_they_were(models):
    run, method, teachers, _, _ = make_step(models, "mmt-ard", pgd_steps=1)
    count_step_flops(run, method, teachers)
    assert "attack" not in vars(method)
    for teacher in teachers.values():
        assert not teacher._forward_hooks and not teacher._forward_pre_hooks

    def failing_step():
        raise ValueError("stop")

    with pytest.raises(ValueError):
        count_step_flops(failing_step, method, teachers)
    assert "attack" not in vars(method)
    assert all(not t._forward_hooks and not t._forward_pre_hooks for t in teachers.values())


def test_timed_phases_add_up_to_the_step(models):
    run, method, teachers, _, _ = make_step(models, "mmt-ard", pgd_steps=1)
    seconds = time_step(run, method, teachers, torch.device("cpu"))
    assert set(seconds) == {"total", *PHASES}
    assert all(seconds[phase] > 0 for phase in PHASES)
    assert sum(seconds[phase] for phase in PHASES) == pytest.approx(seconds["total"])


def test_mfu_is_flops_over_time_over_peak():
    # 6 TFLOP in 0.5 s is 12 TFLOP/s, 40% of a 30 TFLOP/s card
    assert mfu(6e12, 0.5, 30e12) == pytest.approx(0.4)
    assert mfu(0, 1.0, 1.0) == 0
    for bad in [(1e12, 0.0, 1e12), (1e12, 1.0, 0.0), (-1.0, 1.0, 1.0)]:
        with pytest.raises(ConfigError, match="mfu"):
            mfu(*bad)


def test_matmul_rate_is_measured_on_a_cpu():
    tflops = measure_matmul_tflops("cpu", torch.float32, n=64, repeats=2)
    assert math.isfinite(tflops) and tflops > 0


def _rows(path: Path) -> dict:
    summary = json.loads(path.read_text())
    return summary, {(r["method"], r["batch"], r["lever"]): r for r in summary["results"]}


def test_gpu_step_time_runs_at_toy_scale_on_a_cpu(tmp_path, load_script):
    bench = load_script("gpu_step_time")
    argv = ["--device", "cpu", "--student", "tiny-vit-s", "--teacher", "tiny-vit-l", "--batch-sizes", "4"]
    argv += ["--steps", "2", "--warmup", "1", "--pgd-steps", "2", "--num-classes", "10", "--matmul-n", "64"]
    bench.main(argv + ["--out", str(tmp_path), "--name", "toy"])
    summary, rows = _rows(tmp_path / "toy.json")
    assert set(rows) == {(m, 4, "none") for m in ("ard", "mmt-ard", "tecoa")}
    peak = summary["matmul"]["tflops"] * 1e12
    for row in rows.values():
        assert row["status"] == "ok"
        flops = row["flops_per_step"]
        assert flops["total"] == sum(flops[phase] for phase in PHASES)
        assert row["mfu"] == pytest.approx(flops["total"] / row["seconds_per_step"] / peak)
        assert row["gflops_per_image"] == pytest.approx(flops["total"] / 4 / 1e9)
    assert rows[("tecoa", 4, "none")]["flops_per_step"]["teachers"] == 0
    assert set(summary["mmt_ard_over_ard_step_time"]) == {"batch 4, none"}
    table = (tmp_path / "toy.md").read_text()
    assert sum(line.startswith(("| ard |", "| mmt-ard |", "| tecoa |")) for line in table.splitlines()) == 3


def test_gpu_step_time_cpu_levers_a_warm_teacher_cache_and_one_thread(tmp_path, load_script):
    """``teacher-cache``: after the first step the teachers' clean-image logits come from the cache. ard's robust
    teacher is read twice a step, on the clean images (the inner attack's target: cached) and on the adversarial
    ones (``robust_target: adversarial``: not cacheable), so a warm step runs exactly half the teachers' FLOPs.
    ``one-thread`` runs the cell on one thread and gives the others back."""
    bench = load_script("gpu_step_time")
    threads = torch.get_num_threads()
    argv = ["--device", "cpu", "--student", "tiny-vit-s", "--teacher", "tiny-vit-s", "--methods", "ard", "tecoa"]
    argv += ["--batch-sizes", "4", "--steps", "1", "--warmup", "1", "--pgd-steps", "1", "--num-classes", "5"]
    argv += ["--levers", "none", "teacher-cache", "one-thread", "--matmul-n", "64"]
    bench.main(argv + ["--out", str(tmp_path), "--name", "levers"])
    _, rows = _rows(tmp_path / "levers.json")
    assert all(row["status"] == "ok" for row in rows.values())
    plain, cached = rows[("ard", 4, "none")], rows[("ard", 4, "teacher-cache")]
    assert plain["flops_per_step"]["teachers"] > 0
    assert cached["flops_per_step"]["teachers"] * 2 == plain["flops_per_step"]["teachers"]
    assert cached["flops_per_step"]["attack"] == plain["flops_per_step"]["attack"]
    assert rows[("tecoa", 4, "teacher-cache")]["flops_per_step"] == rows[("tecoa", 4, "none")]["flops_per_step"]
    assert torch.get_num_threads() == threads


def test_gpu_step_time_records_an_out_of_memory_batch_and_goes_on(tmp_path, monkeypatch, load_script):
    bench = load_script("gpu_step_time")
    real_step = bench.train_step

    def step(state, batch, **kwargs):
        if batch[0].shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(state, batch, **kwargs)

    monkeypatch.setattr(bench, "train_step", step)
    argv = ["--device", "cpu", "--student", "tiny-vit-s", "--teacher", "tiny-vit-s", "--methods", "tecoa"]
    argv += ["--batch-sizes", "4", "2", "--steps", "1", "--warmup", "0", "--pgd-steps", "1", "--num-classes", "5"]
    bench.main(argv + ["--matmul-n", "64", "--out", str(tmp_path), "--name", "oom"])
    _, rows = _rows(tmp_path / "oom.json")
    assert rows[("tecoa", 4, "none")]["status"] == "oom"
    assert rows[("tecoa", 2, "none")]["status"] == "ok"
    assert "| tecoa | 4 | none | OOM |" in (tmp_path / "oom.md").read_text()


def test_aa_throughput_runs_at_toy_scale_on_a_cpu(tmp_path, load_script):
    bench = load_script("aa_throughput")
    assert bench.parse_cell("hf-hub:org/repo:bf16:8:aa+apgd-ce") == ("hf-hub:org/repo", "bf16", 8, ["aa", "apgd-ce"])
    argv = ["--device", "cpu", "--cells", "tiny-vit-s:fp32:3:apgd-ce", "--steps", "1", "--num-classes", "5"]
    bench.main(argv + ["--out", str(tmp_path), "--name", "aa"])
    (row,) = json.loads((tmp_path / "aa.json").read_text())["results"]
    (attack,) = row["attacks"]
    assert (row["status"], row["images"], attack["attack"], attack["steps"]) == ("ok", 3, "apgd-ce", 1)
    assert attack["images_per_s"] == pytest.approx(3 / attack["seconds"])
    assert 0 <= attack["robust_fraction"] <= 1


def test_loader_throughput_reads_every_generated_image(tmp_path, load_script):
    bench = load_script("loader_throughput")
    summary = bench.main(["--images", "6", "--classes", "2", "--width", "40", "--height", "30", "--image-size", "32",
                          "--batch-size", "4", "--workers", "0", "--json", str(tmp_path / "loader.json")])  # fmt: skip
    (row,) = summary["results"]
    assert (row["workers"], row["images"]) == (0, 6)
    assert row["images_per_s"] == pytest.approx(6 / row["seconds"])
    # 2 steps/s of batch 128 from workers reading 100 images/s each: 256 / 100 -> 3 workers
    assert bench.workers_needed(2.0, 128, 100.0) == 3
    assert bench.workers_needed(1.0, 100, 100.0) == 1
