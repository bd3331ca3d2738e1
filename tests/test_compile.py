"""``train.compile``: compiled training steps equal eager ones within float tolerance; a machine that cannot
compile is one clear error before anything is written.

The equality test compiles a tiny MMT-ARD step for real (Inductor, C++ on the CPU): the student's graphs
(the attack's input gradient, the training forward and backward) and the teachers' no-grad forward. That
took 72 s on 2 busy CPU cores with an empty Inductor cache and 11 s once Inductor's on-disk cache held the
kernels, so it is marked ``slow``; it still runs in the default suite. It is skipped, with the reason, where
``torch.compile`` cannot run (no C++ compiler, a Python that TorchDynamo does not support).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_npz_dir
from safetensors.torch import load_file

from mmtard import preflight
from mmtard.cli import main
from mmtard.errors import ConfigError
from mmtard.train import load_config
from mmtard.train import trainer as trainer_module
from mmtard.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run on this CPU, or None when it can."""
    try:
        preflight.check_compile(torch.device("cpu"))
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("compile-data"), train_per_class=8, test_per_class=2)


def tiny_run(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """MMT-ARD with tiny-vit-s teachers, 3 steps of batch 8 (seen classes: 40 images), PGD-1, a checkpoint
    every step, no held-out evaluation."""
    return [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "teachers.clean.arch=tiny-vit-s",
        "teachers.robust.arch=tiny-vit-s",
        "method.cache_clean_teacher=false",
        "method.steps=1",
        "data.batch_size=8",
        "data.eval_samples=4",
        "train.steps=3",
        "train.lr=1e-3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
        "eval.final=false",
        *extra,
    ]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable() is not None, reason=f"torch.compile cannot run here: {compile_unavailable()}")
def test_compiled_steps_equal_eager_steps_within_tolerance(data_dir, tmp_path, monkeypatch):
    compiled_models = []
    real_compile_models = trainer_module.compile_models

    def recording_compile_models(student, method):
        real_compile_models(student, method)
        compiled_models.extend([student, *method.teachers.values()])

    monkeypatch.setattr(trainer_module, "compile_models", recording_compile_models)
    train(load_config(MMT_ARD, tiny_run(data_dir, tmp_path / "eager")), progress=False)
    assert not compiled_models
    train(load_config(MMT_ARD, tiny_run(data_dir, tmp_path / "compiled", "train.compile=true")), progress=False)
    assert len(compiled_models) == 3  # the student and both teachers
    assert all(model._compiled_call_impl is not None for model in compiled_models)

    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    assert "first_step_s" in compiled[0] and compiled[0]["first_step_s"] > 0
    assert not any("first_step_s" in r for r in compiled[1:] + eager)
    for got, want in zip(compiled, eager):
        for key in ("loss", "L_C", "L_R", "lambda_R"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)

    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in ("eager", "compiled")}
    assert weights["eager"].keys() == weights["compiled"].keys()  # compiling in place keeps the state-dict names
    step_1 = load_file(str(tmp_path / "eager" / "checkpoints" / "step_00000001" / "model.safetensors"))
    moved = l2_distance(weights["eager"], step_1)  # what steps 2 and 3 changed
    differ = l2_distance(weights["compiled"], weights["eager"])
    assert moved > 0 and differ < 0.01 * moved, (moved, differ)  # measured: 0.56 and 1.8e-4


def l2_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Euclidean distance between two state dicts' floating-point tensors, taken as one vector."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def test_a_missing_cpp_compiler_is_one_error_before_anything_is_written(data_dir, tmp_path, monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.raises(ConfigError, match=r"^train\.compile: torch\.compile on the CPU needs a C\+\+ compiler"):
        preflight.check_compile(torch.device("cpu"))
    out = tmp_path / "run"
    argv = ["train", "--config", str(MMT_ARD), "--no-progress"]
    for item in tiny_run(data_dir, out, "train.compile=true", "device=cpu"):
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("mmtard train: error: train.compile:") and "train.compile=false" in err[0]
    )
    assert not out.exists()


def test_without_triton_compiling_on_cuda_is_refused(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match="train.compile: torch.compile on CUDA needs Triton"):
        preflight.check_compile(torch.device("cuda"))
