"""Faults that lose nothing: NaN in training and evaluation, SIGTERM, a stalled torchrun worker, two runs on
one folder, a torn ``metrics.jsonl``, and a resume that would change the run.

Runs are tiny (tiny-vit-s student and teachers, batch 8, PGD-1, a few steps) on the npz folder of
:func:`test_train.make_npz_dir`. Real signals go to real processes (``python -m mmtard.cli``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import MMT_ARD, REPO, as_argv, lock_released, make_npz_dir, read_metrics, same_weights, small
from safetensors.torch import load_file, save_file

from mmtard.cli import main
from mmtard.train import trainer as trainer_module
from mmtard.train.rundir import RunDir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 10
HANG_GUARD_S = 1200  # only a guard against a hang: a busy shared machine can be very slow, a hang is forever


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("fault-data") / "cifar10")


def cli_process(argv: list[str], cwd: Path = REPO, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmtard.cli", *argv],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition, proc: subprocess.Popen, what: str, limit_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition()`` until true; fail if the process ends first or it never comes (a hang guard)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit_s} s")
        time.sleep(0.05)


def logged_steps(run: Path) -> int:
    try:
        return len(read_metrics(run))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------- NaN


def poison_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the method's loss NaN at the given (1-based) steps."""
    real_train_step = trainer_module.train_step

    def poisoned(state, *args, **kwargs):
        if state.step + 1 in steps:
            real_method = state.method

            class NaNLoss:
                def __getattr__(self, name):
                    return getattr(real_method, name)

                def __call__(self, *a, **k):
                    output = real_method(*a, **k)
                    output.losses = {name: value * float("nan") for name, value in output.losses.items()}
                    return output

            state.method = NaNLoss()
            try:
                return real_train_step(state, *args, **kwargs)
            finally:
                state.method = real_method
        return real_train_step(state, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", poisoned)


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_loss_at(monkeypatch, {4})
    argv = as_argv(MMT_ARD, small(data_dir, out, "train.steps=6", "train.checkpoint_every=2"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard train: error: step 4: the loss is not finite"), err
    assert "checkpoints/step_00000002" in err[0] and "--resume latest" in err[0]
    run = RunDir(out)
    assert run.latest.read_text().strip() == "step_00000002" and not run.model.exists()
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert lock_released(run.lock)


def test_nan_loss_with_skip_drops_that_update_and_counts_it(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_loss_at(monkeypatch, {2})
    argv = as_argv(MMT_ARD, small(data_dir, out, "train.steps=3", "train.on_nonfinite=skip"))
    assert main(argv) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["skipped"] is True and records[1]["skipped_steps"] == 1
    assert records[2]["skipped"] is False and records[2]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


def test_diverging_weights_are_never_written_and_the_run_fails(data_dir, tmp_path, capsys):
    """README's example of a run that used to exit 0 with NaN weights: lr 1e37, no warm-up, one step."""
    out = tmp_path / "run"
    sets = small(data_dir, out, "train.steps=1", "train.lr=1e37", "train.warmup=0", "train.grad_clip=null")
    assert main(as_argv(MMT_ARD, sets)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard train: error: step 1: the student's"), err
    assert "not finite after the update" in err[0] and "No checkpoint was written" in err[0]
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints" / "latest").exists()


def test_eval_refuses_a_model_with_non_finite_weights(npz_dir, tmp_path, capsys):
    from mmtard.models import load_clip

    weights = tmp_path / "nan.safetensors"
    state = load_clip("tiny-vit-s", "none").model.state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    argv = ["eval", "--model", "tiny-vit-s", "--pretrained", str(weights), "--dataset", "cifar10"]
    argv += ["--data-dir", str(npz_dir), "--attack", "none", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard eval: error:") and "finite" in err[0], err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bitwise_the_uninterrupted_one(data_dir, tmp_path):
    sets = ["train.checkpoint_every=0", "eval.final=false"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    proc = cli_process(as_argv(MMT_ARD, small(data_dir, reference, f"train.steps={STEPS}", *sets)))
    assert proc.wait(timeout=HANG_GUARD_S) == 0, proc.stderr.read()[-3000:]

    argv = as_argv(MMT_ARD, small(data_dir, interrupted, f"train.steps={STEPS}", *sets))
    proc = cli_process(argv)
    wait_for(lambda: logged_steps(interrupted) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = RunDir(interrupted).latest.read_text().strip()
    step = int(stopped.split("_")[1])
    assert 2 <= step < STEPS and f"stopped by SIGTERM after step {step}" in stderr and "--resume latest" in stderr
    assert not RunDir(interrupted).model.exists() and lock_released(RunDir(interrupted).lock)

    proc = cli_process([*argv, "--resume", "latest"])
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, stderr[-3000:]
    assert same_weights(interrupted / "model.safetensors", reference / "model.safetensors")
    got, want = read_metrics(interrupted), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b
    umask = os.umask(0)
    os.umask(umask)
    for written in (interrupted / "model.safetensors", *(interrupted / "checkpoints").rglob("*.*")):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written  # the user's umask, as any file


def test_sigterm_in_the_first_epoch_with_the_teacher_logit_cache_resumes_bitwise(data_dir, tmp_path, monkeypatch):
    """``method.cache_clean_teacher`` in memory: a row's last bits depend on the batch it was first computed in,
    so the rows of the first epoch, read again in the second, must come back from the checkpoint, not be
    recomputed in other batches. 80 training images in batches of 8: SIGTERM during step 3 of a 10-step epoch,
    resume, 14 steps in all; the student is bitwise the uninterrupted one's."""
    sets = ["train.steps=14", "train.checkpoint_every=0", "eval.final=false", "method.cache_clean_teacher=true"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert main(as_argv(MMT_ARD, small(data_dir, reference, *sets))) == 0

    real_train_step = trainer_module.train_step

    def sigterm_during_step_3(state, *args, **kwargs):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of this step, as for a scheduler's signal
        return real_train_step(state, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", sigterm_during_step_3)
    argv = as_argv(MMT_ARD, small(data_dir, interrupted, *sets))
    assert main(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert RunDir(interrupted).latest.read_text().strip() == "step_00000003"
    assert main([*argv, "--resume", "latest"]) == 0
    assert same_weights(interrupted / "model.safetensors", reference / "model.safetensors")


# ------------------------------------------------------------------------------- two runs, one folder


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_process(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sets = small(data_dir, out, "train.steps=200", "train.checkpoint_every=2", "eval.final=false")
    first = cli_process(as_argv(MMT_ARD, sets))
    try:
        wait_for(RunDir(out).latest.is_file, first, "the first run's first checkpoint")
        before = (out / "metrics.jsonl").read_text()
        assert main(as_argv(MMT_ARD, sets)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by process {first.pid}" in err[0], err
        assert (out / "metrics.jsonl").read_text().startswith(before)  # nothing of the second run in it
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The system released the killed process's lock; its lock file, still naming it, blocks nothing: the folder resumes.
    assert RunDir(out).lock.read_text().split()[0] == str(first.pid)
    assert main(as_argv(MMT_ARD, [*sets, "train.steps=4"], "--resume", "latest")) == 2  # fewer steps: refused
    assert "train.steps" in capsys.readouterr().err
    assert main(as_argv(MMT_ARD, sets, "--resume", "latest", "--stop-after", "1")) == 0
    assert lock_released(RunDir(out).lock)


# ---------------------------------------------------------------------------------------- resume


@pytest.fixture
def stopped_run(data_dir, tmp_path) -> tuple[Path, list[str]]:
    """A 4-step run stopped after step 2 (checkpoint at 2)."""
    out = tmp_path / "run"
    sets = small(data_dir, out, "train.steps=4", "train.checkpoint_every=2", "eval.final=false")
    assert main(as_argv(MMT_ARD, sets, "--stop-after", "2")) == 0
    return out, sets


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(stopped_run, caplog):
    out, sets = stopped_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # a crash while step 3's line was written
    assert main(as_argv(MMT_ARD, sets, "--resume", "latest")) == 0
    assert "torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "change, field",
    [("method.eps=8/255", "method.eps"), ("student.arch=tiny-vit-m", "student.arch"), ("train.lr=1e-2", "train.lr")],
)
def test_a_resume_that_contradicts_the_saved_config_is_refused_and_changes_nothing(change, field, stopped_run, capsys):
    out, sets = stopped_run
    before = listing(out)
    assert main(as_argv(MMT_ARD, [*sets, change], "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmtard train: error: {field}: the run was started with"), err
    assert listing(out) == before


def test_resume_uses_the_saved_config_and_may_add_steps(stopped_run, data_dir, capsys):
    """README's resume line gives only the folder: the run continues with its own settings (4 steps, its
    data folder), not the config file's (100 steps); ``train.steps`` may grow."""
    out, _ = stopped_run
    assert main(as_argv(MMT_ARD, [f"output_dir={out}"], "--resume", "latest", "--stop-after", "1")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert main(as_argv(MMT_ARD, [f"output_dir={out}", "train.steps=5"], "--resume", "latest")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert "steps: 5" in RunDir(out).config.read_text()


# ------------------------------------------------------------------------------- stalled torchrun worker

DIST_TIMEOUT_S = 20


def worker_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers (read from their environment)."""
    import psutil

    workers = {}
    for child in psutil.Process(parent).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "LOCAL_RANK" in child.environ():
            workers[int(rank)] = child.pid
    return workers


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo")
def test_a_stalled_torchrun_worker_ends_the_run_after_the_configured_timeout(data_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = small(data_dir, out, "train.steps=500", "data.batch_size=16", f"train.dist_timeout_s={DIST_TIMEOUT_S}")
    argv = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mmtard.cli"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *argv, *as_argv(MMT_ARD, sets)],
        cwd=REPO,
        env={**ENV, "TMPDIR": str(tmp_path)},  # torchrun's temp folders go with the test's folder
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: dict[int, int] = {}
    try:
        wait_for(lambda: logged_steps(out) >= 1, proc, "step 1")
        workers = worker_pids(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        # Rank 0 must give up on its own after the timeout (the hang guard is far longer). Then the stopped
        # worker is killed here, as a cluster would: torchrun itself waits 30 s more for it.
        deadline = time.monotonic() + DIST_TIMEOUT_S + HANG_GUARD_S
        while psutil.pid_exists(workers[0]) and psutil.Process(workers[0]).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "rank 0 still waits for the stalled worker"
            time.sleep(0.2)
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert f"train.dist_timeout_s: another process did not answer for {DIST_TIMEOUT_S} s" in stderr, stderr[-3000:]
    assert lock_released(RunDir(out).lock)


def test_sigterm_during_the_final_evaluation_stops_it_and_says_what_is_saved(data_dir, tmp_path, monkeypatch, capsys):
    """Once the model is saved, a SIGTERM stops the final evaluation at once (exit 128 + 15), naming what is on
    disk; --resume latest then evaluates it and writes final_eval.json."""
    out = tmp_path / "run"
    argv = as_argv(MMT_ARD, small(data_dir, out, "train.steps=2", "data.eval_samples=40"))
    real_evaluate = trainer_module.evaluate_student

    def sigterm_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_student", sigterm_while_evaluating)
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during the final evaluation: model.safetensors and the last checkpoint are saved" in err
    assert "then stopping" not in err
    assert (out / "model.safetensors").is_file() and not (out / "final_eval.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume", "latest"]) == 0
    assert (out / "final_eval.json").is_file()
