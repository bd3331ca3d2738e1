"""The training loop: one code path for one CPU process and for ``torchrun`` on many GPUs.

``train(config)`` checks what the config points at (:func:`check_run`), builds the run (:func:`build_run`, from
the builders of :mod:`mmtard.train.build`), then runs :func:`train_loop`: one :func:`train_step` per batch of
:func:`~mmtard.train.batches.batches`, logging (:mod:`~mmtard.train.metrics_log`), held-out evaluations and
checkpoints (:mod:`~mmtard.train.checkpoint`). Everything that must survive a resume lives in
:class:`~mmtard.train.state.TrainState` and goes into each checkpoint.

Order of work, so that a refused run leaves the file system as it found it: check what the config points
at (:mod:`mmtard.train.checks`), build models, data and optimizer and restore the checkpoint, agree
across processes that every one of them succeeded, and only then lock the run folder and write to it.
Faults lose nothing (:mod:`~mmtard.train.faults`): a non-finite loss stops the run (or skips the batch,
``train.on_nonfinite``) and non-finite weights are never saved; SIGTERM / SIGINT save a checkpoint at the end
of the current step.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mmtard import preflight
from mmtard.data import ImageDataset, TrainAugment, step_generator
from mmtard.distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from mmtard.errors import NonFiniteError, TrainingInterrupted, WorkerTimeoutError
from mmtard.eval.zeroshot import evaluate_classifier
from mmtard.fileio import atomic_write_text, reported_write_errors
from mmtard.methods import create_method
from mmtard.models import CLIPBundle, build_zero_shot_classifier, load_clip
from mmtard.provenance import start_record
from mmtard.train import checkpoint as ckpt
from mmtard.train.batches import batches, check_batch_size
from mmtard.train.build import (
    build_datasets,
    build_optimizer,
    build_precision,
    build_student,
    build_teachers,
    compile_models,
    merged_student_state,
)
from mmtard.train.checks import check_built_image_sizes, check_run
from mmtard.train.config import OptimConfig, RunConfig, build_eval_attacks
from mmtard.train.config_io import config_to_dict, load_config, save_config
from mmtard.train.faults import (
    StopSignals,
    agree,
    check_finite_student,
    handle_non_finite,
    is_collective_timeout,
    last_good_checkpoint,
    non_finite_problem,
    stop_requested,
)
from mmtard.train.metrics_log import MetricsLog, logged_values
from mmtard.train.rundir import RunDir, RunLock
from mmtard.train.state import Setup, TrainState

logger = logging.getLogger(__name__)

__all__ = ["Setup", "TrainState", "build_optimizer", "build_teachers", "train", "train_step"]


def train(cfg: RunConfig, resume: str | None = None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the student of ``cfg``; returns the final evaluation (rank 0) or ``{}``.

    Args:
        cfg: the validated run config.
        resume: ``latest`` or a checkpoint folder to continue from. When the run folder has a
            ``config.yaml``, it is authoritative: ``cfg`` may differ from it only in the fields of
            :data:`mmtard.train.resume.RESUME_EXTENSIONS` (more steps, the data folder, logging...).
        stop_after: stop (with a checkpoint) after this many steps of this invocation, e.g. to fit a
            job's time slot; ``--resume latest`` continues.
        progress: show tqdm bars on rank 0.

    Raises:
        ConfigError: a refused run; nothing was written.
        OutputWriteError: the file system refused a write of the run (a full disk): one line naming the file.
        NonFiniteError: a non-finite loss (``train.on_nonfinite: stop``) or weights; nothing non-finite
            was written and ``checkpoints/latest`` names the last good checkpoint.
        TrainingInterrupted: SIGTERM or SIGINT; a checkpoint of the last finished step was written.
    """
    run = RunDir(cfg.output_dir)
    env = init_distributed(cfg.device, cfg.train.dist_timeout_s)
    resume_from = agree(env, check_run, cfg, run, env, resume, stop_after)
    built = build_run(cfg, env, resume_from)
    lock = RunLock(run)
    try:
        with reported_write_errors("output_dir", run.path):
            agree(env, start_writing, cfg, run, env, lock, built.state.step)
            open_logit_caches(cfg, built, env)
            with StopSignals() as stop:
                return train_loop(cfg, run, env, built, stop_after, progress, stop)
    except RuntimeError as exc:
        if env.distributed and is_collective_timeout(exc):
            raise WorkerTimeoutError(
                f"train.dist_timeout_s: another process did not answer for {cfg.train.dist_timeout_s:g} s after "
                f"step {built.state.step} (a stalled or dead worker), so this one stopped. {last_good_checkpoint(run)}"
            ) from exc
        raise
    finally:
        lock.release()


def build_run(cfg: RunConfig, env: DistEnv, resume_from: Path | None) -> Setup:
    """Everything the loop needs, agreed by every process (:func:`build_parts`), then the student wrapped in
    DistributedDataParallel under torchrun. Nothing is written."""
    built = agree(env, build_parts, cfg, env, resume_from)
    if env.distributed:
        built.state.student = DistributedDataParallel(
            built.state.student, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    return built


def build_parts(cfg: RunConfig, env: DistEnv, resume_from: Path | None) -> Setup:
    """Models, data, method (with its frozen teachers), optimizer; the checkpoint restored. Nothing is written."""
    image_size = preflight.model_image_size(cfg.student.arch)
    if image_size is not None:  # data first: a data error needs no model loaded
        train_set, eval_set = build_datasets(cfg, image_size, cfg.train.seed)
        check_batch_size(cfg, len(train_set), env.world_size)
    torch.manual_seed(cfg.train.seed)  # the same random initial weights on every process
    student_bundle = load_clip(
        cfg.student.arch,
        cfg.student.pretrained,
        device=env.device,
        trust_checkpoint=cfg.student.trust_checkpoint,
        vision_weights=cfg.student.vision_weights,
        vision_weights_alpha=cfg.student.vision_weights_alpha,
        vision_field="student.vision_weights",
    )
    if student_bundle.image_size != image_size:
        train_set, eval_set = build_datasets(cfg, student_bundle.image_size, cfg.train.seed)
        check_batch_size(cfg, len(train_set), env.world_size)
    method = create_method(cfg.method, cfg.teacher_plan())
    check_built_image_sizes(
        cfg, student_bundle.image_size, build_teachers(cfg, method, student_bundle, train_set, env.device)
    )
    build_student(cfg, student_bundle)
    student = build_zero_shot_classifier(
        student_bundle, train_set.classnames, train_set.templates, cfg.method.logit_scale
    )
    student.train()
    if cfg.train.compile:
        compile_models(student, method)
    optimizer, scheduler = build_optimizer(cfg, [p for p in student.parameters() if p.requires_grad])
    precision = build_precision(cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == torch.float16)
    torch.manual_seed(cfg.train.seed + env.rank)  # each process its own attack random starts
    state = TrainState(0, student, optimizer, scheduler, scaler, method)
    if resume_from is not None:
        ckpt.restore(state, student_bundle, resume_from, cfg, env)
        logger.info("resumed from step %d", state.step)
    augment = TrainAugment() if cfg.data.augment else None
    return Setup(state, student_bundle, precision, train_set, eval_set, augment)


def start_writing(cfg: RunConfig, run: RunDir, env: DistEnv, lock: RunLock, step: int) -> None:
    """Rank 0 locks the run folder (creating it), writes ``config.yaml`` and adds this start (from ``step``) to
    ``provenance.json``: the first writes of a run."""
    if env.is_main:
        with reported_write_errors("output_dir", run.path):  # a full disk: one error, agreed by every process
            lock.acquire()
            write_run_config(cfg, run)
            record_start(run, step, env)


def record_start(run: RunDir, step: int, env: DistEnv) -> None:
    """``provenance.json``: the starts of this run (a resume keeps the earlier ones; a fresh run starts the list)."""
    starts = []
    if step > 0 and run.provenance.is_file():
        try:
            starts = json.loads(run.provenance.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            starts = None
        if not isinstance(starts, list):
            logger.warning("%s is not a list of starts; it is started again with this one", run.provenance)
            starts = []
    starts.append(start_record(step, env.world_size, env.device))
    atomic_write_text(run.provenance, json.dumps(starts, indent=2))


def write_run_config(cfg: RunConfig, run: RunDir) -> None:
    """``config.yaml``, unless the folder already holds this very config (a resume that changes nothing)."""
    if run.config.is_file() and config_to_dict(load_config(run.config, field="output_dir")) == config_to_dict(cfg):
        return
    save_config(cfg, run.config)


def open_logit_caches(cfg: RunConfig, built: Setup, env: DistEnv) -> None:
    """``method.cache_dir``: open the disk-backed fp16 caches of the teachers' clean-image logits (one folder
    per teacher whose clean-image logits a step reads), rank 0 first (it creates the stores), then, after a
    barrier, the other processes (they open the same files). A cache written for other teacher weights,
    data, classes or image size is started over. Nothing happens without ``cache_dir``."""
    if cfg.method.cache_dir is None:
        return
    train_set, data = built.train_set, cfg.data
    source = {
        "dataset": data.dataset,
        "data_dir": None if data.dir is None else str(Path(data.dir).resolve()),
        "split": data.split,
        "classnames": list(train_set.classnames),
        "templates": list(train_set.templates),
        "samples": data.samples,
        "part": data.part,
        "seed": cfg.train.seed,
        "image_size": train_set.image_size,
    }
    rows, classes = len(train_set), len(train_set.classnames)
    if env.is_main:
        built.state.method.open_logit_caches(rows=rows, classes=classes, data=source)
    barrier()
    if not env.is_main:
        built.state.method.open_logit_caches(rows=rows, classes=classes, data=source)


def train_loop(
    cfg: RunConfig, run: RunDir, env: DistEnv, built: Setup, stop_after: int | None, progress: bool, stop: StopSignals
) -> dict:
    """The steps from the restored one to the last (:func:`train_step`), each followed by its named steps: log,
    evaluate, checkpoint; then :func:`finish`. Returns the final evaluation (rank 0) or ``{}``."""
    state = built.state
    log = MetricsLog(run, env.is_main, state.step)
    last_step = cfg.train.steps if stop_after is None else min(cfg.train.steps, state.step + stop_after)
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        desc=f"train {cfg.method.name}",
        disable=not (progress and env.is_main),
    )
    stream = batches(built.train_set, cfg, env, state.step)
    timer = FirstStepTimer(cfg.train.compile)
    try:
        while state.step < last_step:
            started = time.perf_counter()
            epoch, batch = next(stream)
            batch = device_batch(batch, built, cfg, env)
            lr = state.scheduler.get_last_lr()[0]  # the rate this step uses
            try:
                loss, output, skipped = train_step(state, batch, precision=built.precision, optim=cfg.train)
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc}. {last_good_checkpoint(run)}") from None
            bar.update(1)
            timer.stop(started)
            if state.step % cfg.train.log_every == 0 or state.step == last_step or skipped:
                record = log_step(cfg, env, log, state, epoch, loss, output, lr, skipped, started, timer)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            evaluate_if_due(cfg, env, log, built)
            checkpoint_if_due(cfg, run, env, built, last_step, stop)
        bar.close()
        final = finish(cfg, run, env, built, log, progress, stop)
    finally:
        bar.close()
        log.close()
    barrier()
    return final


class FirstStepTimer:
    """``train.compile``: the seconds of this invocation's first step (compilation included), until a logged
    record carries them (``first_step_s``)."""

    def __init__(self, timing: bool):
        self.timing, self.seconds = timing, None

    def stop(self, started: float) -> None:
        if self.timing:
            self.seconds, self.timing = time.perf_counter() - started, False
            logger.info("train.compile: the first step took %.1f s, compilation included", self.seconds)

    def take(self) -> float | None:
        seconds, self.seconds = self.seconds, None
        return seconds


def device_batch(batch: tuple, built: Setup, cfg: RunConfig, env: DistEnv) -> tuple:
    """``(x, y, index)`` on the run's device, ``x`` augmented with ``data.augment`` (boxes drawn from the seed, the
    step and the rank: a resume redraws them)."""
    x, y, index = batch
    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
    if built.augment is not None:
        x = built.augment(x, generator=step_generator(cfg.train.seed, built.state.step, env.rank))
    return x, y, index.to(env.device)


def log_step(cfg, env, log, state, epoch, loss, output, lr, skipped, started, timer) -> dict:
    """One ``metrics.jsonl`` record of the step just taken (its losses and metrics read from the device here)."""
    record = {
        "step": state.step,
        "epoch": epoch,
        **logged_values(loss, output.metrics, env),
        "lr": lr,
        "samples_per_s": cfg.data.batch_size / (time.perf_counter() - started),
    }
    if state.skipped_steps:
        record.update(skipped=skipped, skipped_steps=state.skipped_steps)
    first_step_s = timer.take()
    if first_step_s is not None:
        record["first_step_s"] = first_step_s
    log.log(record)
    return record


def evaluate_if_due(cfg: RunConfig, env: DistEnv, log: MetricsLog, built: Setup) -> None:
    """The periodic held-out evaluation (``eval.every``; not at the last step, which :func:`finish` evaluates)."""
    step = built.state.step
    if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
        if env.is_main:
            log.log_eval(step, evaluate_student(cfg, built.student_bundle, built.eval_set, progress=False))
        barrier()


def checkpoint_if_due(cfg: RunConfig, run: RunDir, env: DistEnv, built: Setup, last_step: int, stop) -> None:
    """A checkpoint every ``train.checkpoint_every`` steps, at this invocation's last step and on SIGTERM / SIGINT,
    which then stops the run (:class:`TrainingInterrupted`)."""
    step = built.state.step
    signum = stop_requested(stop, env)
    if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == last_step or signum:
        saved = ckpt.save(built.state, built, cfg, run, env)
        barrier()
        if signum:
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint "
                f"{saved or run.checkpoints}; run the same command with --resume latest to continue",
                signum,
            )


def finish(
    cfg: RunConfig, run: RunDir, env: DistEnv, built: Setup, log: MetricsLog, progress: bool, stop: StopSignals
) -> dict:
    """After the last planned step: the finite-weights check (every process), then on rank 0 the final student
    (``model.safetensors``) and evaluation (``final_eval.json``). Nothing before the last planned step. A
    SIGTERM / SIGINT once the model is saved stops the final evaluation at once (:class:`StopSignals`)."""
    final: dict = {}
    if built.state.step != cfg.train.steps:
        return final
    check_finite_student(built, built.state.step, run)  # on every process: none left waiting
    if env.is_main:
        ckpt.save_model_file(run.model, merged_student_state(built.student_bundle))
        stop.finishing = True
        if cfg.eval.final:
            final = evaluate_student(cfg, built.student_bundle, built.eval_set, progress=progress)
            log.log_eval(built.state.step, final)
            atomic_write_text(run.final_eval, json.dumps(final, indent=2))
    return final


def train_step(state: TrainState, batch: tuple, *, precision: torch.dtype | None, optim: OptimConfig):
    """One optimizer step on ``batch = (x, y, index)``: the method's loss under autocast (``precision``, None for
    fp32), backward, clipping (``optim.grad_clip``), update. Returns ``(loss, MethodOutput, skipped)``.

    A non-finite loss (agreed across processes) raises :class:`NonFiniteError` before any update, or with
    ``optim.on_nonfinite: skip`` drops this batch's update: the step counts (the schedule and the data order
    stay those of the planned run) and ``state.skipped_steps`` grows. With gradient clipping, a non-finite
    gradient norm is handled the same way. Both checks are read from the device together, after the backward:
    the trainer's one host sync of a step that is not logged. The methods read their metrics from the device
    inside the step (one copy for ``mmt-ard``, a few ``.item()`` for the others); the loss stays a tensor until it
    is logged.
    """
    x, y, index = batch
    with torch.autocast(x.device.type, dtype=precision, enabled=precision is not None):
        output = state.method(state.student, x, y, index)
    loss = output.total()
    loss_finite = all_reduce_mean(torch.isfinite(loss.detach()).float())  # 1 on every process, or not
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    norm = None
    if optim.grad_clip:
        state.scaler.unscale_(state.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(state.params, optim.grad_clip)
    problem = non_finite_problem(loss, loss_finite, norm, state.scaler)
    if problem:
        return handle_non_finite(state, optim, loss, output, problem)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return loss, output, False


def evaluate_student(cfg: RunConfig, bundle: CLIPBundle, eval_set: ImageDataset, progress: bool) -> dict:
    """Clean and PGD robust accuracy of the student on the held-out split, through the evaluation code."""
    classifier = build_zero_shot_classifier(bundle, eval_set.classnames, eval_set.templates, cfg.method.logit_scale)
    attacks = build_eval_attacks(cfg)
    return evaluate_classifier(
        classifier, eval_set, attacks, batch_size=cfg.eval.batch_size, progress=progress
    ).to_dict()
