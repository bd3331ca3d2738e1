"""The training loop: one code path for one CPU process and for ``torchrun`` on many GPUs.

``train(config)`` reads as a few ``build_*`` calls and a loop. Everything that must survive a resume
lives in ``TrainState`` and goes into each checkpoint.

Order of work, so that a refused run leaves the file system as it found it: check what the config points
at (:mod:`mmtard.preflight`), build models, data and optimizer and restore the checkpoint, agree
across processes that every one of them succeeded, and only then lock the run folder and write to it.
Faults lose nothing: a non-finite loss stops the run (or skips the batch, ``train.on_nonfinite``) and
non-finite weights are never saved; SIGTERM / SIGINT save a checkpoint at the end of the current step.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from mmtard import preflight
from mmtard.data import ImageDataset, TrainAugment, create_dataset, step_generator
from mmtard.distributed import (
    DistEnv,
    all_reduce_mean,
    any_process,
    barrier,
    gather_objects,
    init_distributed,
)
from mmtard.errors import ConfigError, NonFiniteError, TrainingInterrupted, WorkerTimeoutError
from mmtard.eval.zeroshot import evaluate_classifier
from mmtard.fileio import atomic_write_text
from mmtard.methods import Method
from mmtard.models import CLIPBundle, ZeroShotClassifier, build_zero_shot_classifier, load_clip
from mmtard.train import checkpoint as ckpt
from mmtard.train.config import (
    RunConfig,
    build_eval_attacks,
    build_method,
    check_resume,
    load_config,
    method_teachers,
    save_config,
    unused_teachers,
)
from mmtard.train.rundir import RunDir, RunLock, read_jsonl

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What one step reads and updates; saved whole in each checkpoint."""

    step: int
    student: nn.Module  # the student ZeroShotClassifier, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    method: Method
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (train.on_nonfinite: skip)


# ----------------------------------------------------------------------------------------------- build


def build_precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA when supported, fp32 on CPU."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"train.precision: {precision} needs a CUDA device; use fp32 (or auto) on {device.type}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_student(cfg: RunConfig, bundle: CLIPBundle) -> None:
    """Freeze the text tower and logit scale; make the image tower (or its LoRA adapters) trainable."""
    bundle.model.requires_grad_(False)
    if cfg.student.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.student.lora
        peft_config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)
        )
        try:
            bundle.model.visual = get_peft_model(bundle.model.visual, peft_config)
        except ValueError as exc:
            raise ConfigError(
                f"student.lora.targets: {lora.targets} match no layer of {bundle.name}'s image tower ({exc})"
            ) from None
    else:
        bundle.model.visual.requires_grad_(True)


def merged_student_state(bundle: CLIPBundle) -> dict[str, torch.Tensor]:
    """The student's full open_clip state dict, LoRA merged into the weights: a plain CLIP checkpoint."""
    from peft import PeftModel

    visual = bundle.model.visual
    if not isinstance(visual, PeftModel):
        return bundle.model.state_dict()
    merged = copy.deepcopy(visual).merge_and_unload()
    state = {k: v for k, v in bundle.model.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v for k, v in merged.state_dict().items()})
    return state


def adapter_state(bundle: CLIPBundle) -> dict[str, torch.Tensor] | None:
    visual = bundle.model.visual
    if not hasattr(visual, "peft_config"):
        return None
    return {k: v for k, v in visual.state_dict().items() if "lora_" in k}


def build_datasets(cfg: RunConfig, image_size: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """The training and held-out sets; a data error names the run config's field (``data.eval_split``...)."""
    data = cfg.data
    common = dict(image_size=image_size, seed=seed)
    with preflight.renamed_fields(data_fields("")):
        train_set = create_dataset(
            data.dataset, data.dir, split=data.split, classes=data.classes, samples=data.samples, **common
        )
    with preflight.renamed_fields(data_fields("eval_")):
        eval_set = create_dataset(
            data.dataset,
            data.dir,
            split=data.eval_split,
            classes=data.eval_classes,
            samples=data.eval_samples,
            **common,
        )
    return train_set, eval_set


def data_fields(prefix: str) -> dict[str, str]:
    """The run config's names (``data.dir``, ``data.<prefix>split``...) of the data layer's fields."""
    return {
        "dataset": "data.dataset",
        "data_dir": "data.dir",
        "classnames": "data.dir",
        "split": f"data.{prefix}split",
        "classes": f"data.{prefix}classes",
        "samples": f"data.{prefix}samples",
    }


def build_teachers(
    cfg: RunConfig, method: Method, student: CLIPBundle, dataset: ImageDataset, device
) -> dict[str, ZeroShotClassifier]:
    """The method's frozen teachers on the training label set (:meth:`Method.build_teachers`), by name."""
    return method.build_teachers(cfg.teachers, student, dataset.classnames, dataset.templates, device)


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter]):
    optim = cfg.train
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas))
    warmup = int(round(optim.warmup * optim.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, optim.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ------------------------------------------------------------------------------------------------ data


def batches(dataset: ImageDataset, cfg: RunConfig, env: DistEnv, start_step: int) -> Iterator[tuple[int, tuple]]:
    """Endless ``(epoch, batch)`` stream of this process's share of each global batch, from ``start_step``.

    The order depends only on the seed and the epoch (``DistributedSampler``), so a resumed run sees the
    same batches as an uninterrupted one, and N processes together see the same global batches as one.
    """
    global_batch = cfg.data.batch_size
    check_batch_size(cfg, len(dataset), env.world_size)
    local_batch = global_batch // env.world_size
    per_epoch = len(dataset) // global_batch
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunks = [order[i * local_batch : (i + 1) * local_batch] for i in range(per_epoch)][skip:]
        # Its own generator: creating a DataLoader iterator draws a worker base seed, and a draw from the
        # global RNG would shift the attack's random starts after a resume (a new loader mid-epoch).
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=chunks,
            num_workers=cfg.data.workers,
            pin_memory=env.device.type == "cuda",
            generator=generator,
        )
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def check_batch_size(cfg: RunConfig, images: int, world_size: int) -> None:
    """The global batch splits evenly over the processes and fits in the training set at least once."""
    global_batch = cfg.data.batch_size
    if global_batch % world_size:
        raise ConfigError(f"data.batch_size: the global batch {global_batch} must divide by the {world_size} processes")
    if global_batch > images:
        raise ConfigError(f"data.batch_size: {global_batch} is larger than the {images} training images")


# ---------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """``metrics.jsonl`` (one object per logged step), ``eval.jsonl`` and TensorBoard, on rank 0 only.

    TensorBoard is optional (``pip install mmtard[tensorboard]``): without it the run logs a warning once
    and writes the JSON logs alone, which hold every number TensorBoard would show.
    """

    def __init__(self, run: RunDir, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.metrics_path = run.metrics
        self.eval_path = run.eval_log
        self.writer = None
        if not enabled:
            return
        for path in (self.metrics_path, self.eval_path):  # drop lines logged after the checkpoint resumed from
            if path.exists():
                kept = [record for record in read_jsonl(path) if record["step"] <= resume_step]
                atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
        self.writer = tensorboard_writer(run, resume_step)

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, record)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def log_eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, {"step": step, **result})
        if self.writer is None:
            return
        self.writer.add_scalar("eval/clean_acc", result["clean_acc"], step)
        for entry in result["robust"]:
            self.writer.add_scalar(f"eval/{entry['attack']}_{entry['eps']}", entry["acc"], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(run: RunDir, resume_step: int):
    """A TensorBoard ``SummaryWriter`` on ``run.tensorboard``, or None (with a warning) without tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning(
            "tensorboard is not installed: no TensorBoard events (metrics.jsonl and eval.jsonl hold every number); "
            "pip install 'mmtard[tensorboard]' to have them"
        )
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1 if resume_step else None)


# ------------------------------------------------------------------------------------------------- loop


def logged_values(loss: torch.Tensor, metrics: dict, env: DistEnv) -> dict:
    """The step's loss and metrics as Python numbers over the global batch, read from the device here, at
    log time only, in one transfer (the steps in between never wait for the device to report a number).

    ``loss`` is the mean over processes of each one's loss (in float32, as computed). A metric is the mean
    over processes of each one's value, in float64 (the batch accuracies are per shard; terms the method
    already averaged across processes are unchanged); in one process a metric that is already a Python
    number is kept as it is. Metrics may be tensors (one element) or Python numbers.

    Returns:
        ``{"loss": float, **metrics}``.
    """
    names = [
        name
        for name, value in metrics.items()
        if isinstance(value, torch.Tensor) or (env.distributed and isinstance(value, (int, float)))
    ]
    values = [all_reduce_mean(loss.detach().float()).double().reshape(1)]
    if names:
        values.append(all_reduce_mean(torch.stack([as_float64(metrics[name], loss.device) for name in names])))
    loss_value, *means = torch.cat(values).tolist()  # the one host sync of a logged step
    return {"loss": loss_value, **metrics, **dict(zip(names, means))}


def as_float64(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A one-element tensor or a Python number as a float64 scalar on ``device`` (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def evaluate_student(cfg: RunConfig, bundle: CLIPBundle, eval_set: ImageDataset, progress: bool) -> dict:
    """Clean and PGD robust accuracy of the student on the held-out split, through the evaluation code."""
    classifier = build_zero_shot_classifier(bundle, eval_set.classnames, eval_set.templates, cfg.method.logit_scale)
    attacks = build_eval_attacks(cfg)
    return evaluate_classifier(
        classifier, eval_set, attacks, batch_size=cfg.eval.batch_size, progress=progress
    ).to_dict()


PROBE_IMAGES = 8  # held-out images the student must map to finite logits before its weights are saved


def check_finite_student(built: Run, step: int, run: RunDir) -> None:
    """Raise :class:`NonFiniteError` if a trained weight is NaN or infinite, or if the student's logits on a
    few held-out images are (weights can be finite yet so large that the logits overflow). Weights are
    identical on every process, so every process raises together; nothing is written."""
    if not all(bool(torch.isfinite(p.detach()).all()) for p in built.params):
        what = "weights are"
    elif not bool(torch.isfinite(probe_logits(built)).all()):
        what = "logits on held-out images are"
    else:
        return
    raise NonFiniteError(
        f"step {step}: the student's {what} not finite after the update (train.lr too high?); nothing was saved. "
        f"{last_good_checkpoint(run)}"
    )


@torch.no_grad()
def probe_logits(built: Run) -> torch.Tensor:
    """The student's logits on the first :data:`PROBE_IMAGES` held-out images, in eval mode (batch-norm
    statistics untouched), leaving the mode as it was; eagerly (``forward``: with ``train.compile`` the
    compiled call would compile an eval-mode graph for these few images)."""
    student = built.student
    images = torch.stack([built.eval_set[i][0] for i in range(min(PROBE_IMAGES, len(built.eval_set)))])
    was_training = student.training
    student.eval()
    try:
        return student.forward(images.to(next(student.parameters()).device))
    finally:
        student.train(was_training)


def last_good_checkpoint(run: RunDir) -> str:
    """A sentence naming the checkpoint ``latest`` points at, for error messages."""
    if run.latest.is_file():
        return f"The last good checkpoint is {run.checkpoint(run.latest.read_text().strip())} (--resume latest)."
    return "No checkpoint was written before it."


def save(state: TrainState, built: Run, cfg: RunConfig, run: RunDir, env: DistEnv) -> Path | None:
    """Write a checkpoint from rank 0; every process must call it (it gathers each one's RNG state).
    A student with non-finite weights or logits is refused (:func:`check_finite_student`), so ``latest``
    always names a good one."""
    check_finite_student(built, state.step, run)
    bundle = built.student_bundle
    rng = gather_objects(ckpt.rng_state())  # one per process: each draws its own attack random starts
    if not env.is_main:
        return None
    trainer_state = {
        "step": state.step,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng,
        "method": state.method.state_dict(),
        "skipped_steps": state.skipped_steps,
    }
    return ckpt.save_checkpoint(
        run.checkpoints,
        state.step,
        merged_student_state(bundle),
        trainer_state,
        adapter_state(bundle),
        cfg.train.keep_checkpoints,
    )


def restore(state: TrainState, bundle: CLIPBundle, path: Path, cfg: RunConfig, env: DistEnv) -> None:
    model_state, trainer_state, adapter = ckpt.load_checkpoint_files(path)
    if (adapter is not None) != (cfg.student.finetune == "lora"):
        kind = "a LoRA" if adapter is not None else "a full fine-tuning"
        raise ConfigError(f"--resume: '{path}' is {kind} checkpoint, but student.finetune is {cfg.student.finetune}")
    try:
        if adapter is not None:  # the frozen base weights come from student.pretrained, as in the first run
            loaded = bundle.model.visual.load_state_dict(adapter, strict=False)
            missing = [k for k in loaded.missing_keys if "lora_" in k]
            if loaded.unexpected_keys or missing:
                raise ConfigError(
                    f"--resume: the LoRA adapters in '{path}' do not match student.lora "
                    f"(not in the model: {loaded.unexpected_keys[:2]}, not in the checkpoint: {missing[:2]})"
                )
        else:
            bundle.model.load_state_dict(model_state)
    except RuntimeError as exc:  # shapes of another architecture or LoRA rank
        raise ConfigError(f"--resume: '{path}' does not fit the student {cfg.student.arch}: {exc}") from None
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    state.scheduler.load_state_dict(trainer_state["scheduler"])
    state.scaler.load_state_dict(trainer_state["scaler"])
    state.method.load_state_dict(trainer_state["method"])
    state.step = int(trainer_state["step"])
    state.skipped_steps = int(trainer_state.get("skipped_steps", 0))
    rng = trainer_state["rng"]
    rng = [rng] if isinstance(rng, dict) else rng
    if len(rng) == env.world_size:
        ckpt.set_rng_state(rng[env.rank])
    else:  # another number of processes: the run continues, but not as the uninterrupted one would
        logger.warning(
            "checkpoint %s was written by %d process(es), this run has %d: attack random starts are reseeded",
            path,
            len(rng),
            env.world_size,
        )
        torch.manual_seed((cfg.train.seed + env.rank) * 1_000_003 + state.step)


def train_step(
    state: TrainState,
    teachers: dict[str, ZeroShotClassifier],
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor | None,
    autocast_dtype: torch.dtype | None,
    params: list[nn.Parameter],
    cfg: RunConfig,
):
    """One optimizer step: the method's loss under autocast, backward, clipping, update. Returns
    ``(loss, MethodOutput, skipped)``.

    A non-finite loss (agreed across processes) raises :class:`NonFiniteError` before any update, or with
    ``train.on_nonfinite: skip`` drops this batch's update: the step counts (the schedule and the data order
    stay those of the planned run) and ``state.skipped_steps`` grows. With gradient clipping, a non-finite
    gradient norm is handled the same way. Both checks are read from the device together, after the
    backward: the step's one host sync (the loss and metrics stay on the device until they are logged).
    """
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = state.method(state.student, teachers, x, y, index)
    loss = output.total()
    loss_finite = all_reduce_mean(torch.isfinite(loss.detach()).float())  # 1 on every process, or not
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    norm = None
    if cfg.train.grad_clip:
        state.scaler.unscale_(state.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    problem = non_finite_problem(loss, loss_finite, norm, state.scaler)
    if problem:
        return _non_finite(state, cfg, loss, output, problem)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return loss, output, False


def non_finite_problem(
    loss: torch.Tensor, loss_finite: torch.Tensor, norm: torch.Tensor | None, scaler: torch.amp.GradScaler
) -> str | None:
    """What is not finite in this step (None when all is well), read from the device in one transfer.

    Args:
        loss: this process's loss.
        loss_finite: the mean over processes of ``isfinite(loss)``: 1 when every process's loss is finite.
        norm: the clipped gradients' total norm, or None without clipping. A non-finite norm with fp16's
            grad scaler (scale above 1) is the scaler's to handle: it skips such steps itself.
    """
    checks = [loss_finite < 1] if norm is None else [loss_finite < 1, ~torch.isfinite(norm)]
    loss_bad, *norm_bad = torch.stack(checks).tolist()
    if loss_bad:
        return f"the loss is not finite on some process (here {loss.item()})"
    if norm_bad and norm_bad[0] and scaler.get_scale() == 1.0:
        return f"the gradient norm is not finite ({norm.item()})"
    return None


def _non_finite(state: TrainState, cfg: RunConfig, loss: torch.Tensor, output, what: str):
    step = state.step + 1
    if cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(
            f"step {step}: {what}, terms {plain_metrics(output.metrics)}; stopped before the update "
            "(train.on_nonfinite: stop). Lower train.lr or check the teachers, or set train.on_nonfinite=skip "
            "to drop such batches"
        )
    logger.warning("step %d: %s; this batch's update is dropped (train.on_nonfinite: skip)", step, what)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.is_enabled():  # forget this step's unscale_, keep the scale as it was
        state.scaler.update(state.scaler.get_scale())
    state.scheduler.step()
    state.step += 1
    state.skipped_steps += 1
    return loss, output, True


def plain_metrics(metrics: dict) -> dict:
    """``metrics`` with one-element tensors read as Python floats (for messages)."""
    return {name: value.item() if isinstance(value, torch.Tensor) else value for name, value in metrics.items()}


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop at the end of the current step, with a checkpoint.

    Installed only in the main thread (Python's rule for signal handlers); a second SIGINT interrupts at
    once (``KeyboardInterrupt``). The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping", signal.strsignal(signum)
        )


def stop_requested(stop: StopSignals, env: DistEnv) -> int:
    """The signal any process received (0 if none): every process stops at the same step."""
    return any_process(stop.signum) if env.distributed else stop.signum


@dataclass
class Run:
    """Everything ``train`` builds before its loop (and before it writes anything)."""

    state: TrainState
    student_bundle: CLIPBundle
    teachers: dict[str, ZeroShotClassifier]
    student: ZeroShotClassifier  # the student's classifier, unwrapped (``state.student`` may be its DDP wrapper)
    params: list[nn.Parameter]
    autocast_dtype: torch.dtype | None
    train_set: ImageDataset
    eval_set: ImageDataset
    augment: TrainAugment | None = None  # data.augment: applied to every training batch


def check_run(cfg: RunConfig, run: RunDir, env: DistEnv, resume: str | None, stop_after: int | None) -> Path | None:
    """What the config points at, before anything is built: output folder, lock, models, data, the
    checkpoint to resume and its saved config. Returns the checkpoint folder to resume from (or None)."""
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after: expected a whole number of steps >= 1, got {stop_after}")
    preflight.check_output_dir(run.path, "output_dir")
    if env.is_main:
        RunLock(run).check_free()
    student = cfg.student
    preflight.check_model(
        student.arch,
        student.pretrained,
        "student.arch",
        "student.pretrained",
        trust_checkpoint=student.trust_checkpoint,
    )
    for name in method_teachers(cfg) or {}:
        spec = cfg.teachers[name]
        preflight.check_model(
            spec.arch,
            spec.pretrained,
            f"teachers.{name}.arch",
            f"teachers.{name}.pretrained",
            trust_checkpoint=spec.trust_checkpoint,
        )
    unused = unused_teachers(cfg)
    if unused and env.is_main:
        logger.warning(
            "method %s does not distil from teacher(s) %s (their kind, or a method without teachers): not loaded",
            cfg.method.name,
            ", ".join(unused),
        )
    for split in (cfg.data.split, cfg.data.eval_split):
        preflight.check_data(
            cfg.data.dataset, cfg.data.dir, split, data_fields("eval_" if split != cfg.data.split else "")
        )
    build_precision(cfg, env.device)
    if cfg.train.compile:
        preflight.check_compile(env.device)
    if cfg.method.cache_dir is not None:
        preflight.check_output_dir(cfg.method.cache_dir, "method.cache_dir")
    if not resume:
        return None
    path = ckpt.resolve_resume(run.path, resume)
    ckpt.check_checkpoint_files(path)
    if run.config.is_file():
        check_resume(load_config(run.config), cfg, run.config)
    return path


def build_run(cfg: RunConfig, env: DistEnv, resume_from: Path | None) -> Run:
    """Models, data, method, optimizer; the checkpoint restored. Nothing is written."""
    image_size = preflight.model_image_size(cfg.student.arch)
    if image_size is not None:  # data first: a data error needs no model loaded
        train_set, eval_set = build_datasets(cfg, image_size, cfg.train.seed)
        check_batch_size(cfg, len(train_set), env.world_size)
    torch.manual_seed(cfg.train.seed)  # the same random initial weights on every process
    student_bundle = load_clip(
        cfg.student.arch, cfg.student.pretrained, device=env.device, trust_checkpoint=cfg.student.trust_checkpoint
    )
    if student_bundle.image_size != image_size:
        train_set, eval_set = build_datasets(cfg, student_bundle.image_size, cfg.train.seed)
        check_batch_size(cfg, len(train_set), env.world_size)
    method = build_method(cfg)
    teachers = build_teachers(cfg, method, student_bundle, train_set, env.device)
    build_student(cfg, student_bundle)
    student = build_zero_shot_classifier(
        student_bundle, train_set.classnames, train_set.templates, cfg.method.logit_scale
    )
    student.train()
    if cfg.train.compile:
        compile_models(student, teachers)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    autocast_dtype = build_precision(cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=autocast_dtype == torch.float16)
    torch.manual_seed(cfg.train.seed + env.rank)  # each process its own attack random starts
    state = TrainState(0, student, optimizer, scheduler, scaler, method)
    if resume_from is not None:
        restore(state, student_bundle, resume_from, cfg, env)
        logger.info("resumed from step %d", state.step)
    augment = TrainAugment() if cfg.data.augment else None
    return Run(state, student_bundle, teachers, student, params, autocast_dtype, train_set, eval_set, augment)


def compile_models(student: ZeroShotClassifier, teachers: dict[str, ZeroShotClassifier]) -> None:
    """``torch.compile`` the classifiers a training step calls (``train.compile``), in place
    (``nn.Module.compile``): parameters, state-dict names and checkpoints stay as they are, and the held-out
    evaluation, which builds its own classifier on the student's tower, runs eagerly. ``dynamic=False``:
    the step's shapes are fixed (``drop_last``), so each gets its own static graph."""
    for model in (student, *teachers.values()):
        model.compile(dynamic=False)


def agree(env: DistEnv, work, *args):
    """``work(*args)`` on every process; if it raised a user error on any process, every process raises
    (so none waits in a collective for a process that gave up)."""
    error: Exception | None = None
    try:
        result = work(*args)
    except (ConfigError, FileNotFoundError) as exc:
        if not env.distributed:
            raise
        error, result = exc, None
    if env.distributed and any_process(error is not None):
        if error is not None:
            raise error
        raise ConfigError(f"rank {env.rank}: another process refused the run (its error says why)")
    return result


def start_writing(cfg: RunConfig, run: RunDir, env: DistEnv, lock: RunLock) -> None:
    """Rank 0 locks the run folder (creating it) and writes ``config.yaml``: the first writes of a run."""
    if env.is_main:
        lock.acquire()
        write_run_config(cfg, run)


def write_run_config(cfg: RunConfig, run: RunDir) -> None:
    """``config.yaml``, unless the folder already holds this very config (a resume that changes nothing)."""
    if run.config.is_file() and load_config(run.config) == cfg:
        return
    save_config(cfg, run.config)


def train(cfg: RunConfig, resume: str | None = None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the student of ``cfg``; returns the final evaluation (rank 0) or ``{}``.

    Args:
        cfg: the validated run config.
        resume: ``latest`` or a checkpoint folder to continue from. When the run folder has a
            ``config.yaml``, it is authoritative: ``cfg`` may differ from it only in the fields of
            :data:`mmtard.train.config.RESUME_EXTENSIONS` (more steps, the data folder, logging...).
        stop_after: stop (with a checkpoint) after this many steps of this invocation, e.g. to fit a
            job's time slot; ``--resume latest`` continues.
        progress: show tqdm bars on rank 0.

    Raises:
        ConfigError: a refused run; nothing was written.
        NonFiniteError: a non-finite loss (``train.on_nonfinite: stop``) or weights; nothing non-finite
            was written and ``checkpoints/latest`` names the last good checkpoint.
        TrainingInterrupted: SIGTERM or SIGINT; a checkpoint of the last finished step was written.
    """
    run = RunDir(cfg.output_dir)
    env = init_distributed(cfg.device, cfg.train.dist_timeout_s)
    resume_from = agree(env, check_run, cfg, run, env, resume, stop_after)
    built = agree(env, build_run, cfg, env, resume_from)
    lock = RunLock(run)
    try:
        agree(env, start_writing, cfg, run, env, lock)
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


def is_collective_timeout(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that timed out (gloo: "Timed out waiting ... for recv")."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def open_logit_caches(cfg: RunConfig, built: Run, env: DistEnv) -> None:
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
    cfg: RunConfig, run: RunDir, env: DistEnv, built: Run, stop_after: int | None, progress: bool, stop: StopSignals
) -> dict:
    """The steps from the restored one to the last, logging, held-out evaluations, checkpoints, the end."""
    state, student_bundle = built.state, built.student_bundle
    if env.distributed:
        state.student = DistributedDataParallel(
            state.student, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    open_logit_caches(cfg, built, env)
    log = MetricsLog(run, env.is_main, state.step)
    last_step = cfg.train.steps if stop_after is None else min(cfg.train.steps, state.step + stop_after)
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        desc=f"train {cfg.method.name}",
        disable=not (progress and env.is_main),
    )
    stream = batches(built.train_set, cfg, env, state.step)
    timing_first_step = cfg.train.compile  # time this invocation's first step (compilation included)
    first_step_s = None  # its seconds, until a logged record carries them
    try:
        while state.step < last_step:
            started = time.perf_counter()
            epoch, (x, y, index) = next(stream)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            index = index.to(env.device)
            if built.augment is not None:  # boxes drawn from (seed, step, rank): a resume redraws them
                x = built.augment(x, generator=step_generator(cfg.train.seed, state.step, env.rank))
            lr = state.scheduler.get_last_lr()[0]  # the rate this step uses
            try:
                loss, output, skipped = train_step(
                    state, built.teachers, x, y, index, built.autocast_dtype, built.params, cfg
                )
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc}. {last_good_checkpoint(run)}") from None
            bar.update(1)
            if timing_first_step:
                first_step_s, timing_first_step = time.perf_counter() - started, False
                logger.info("train.compile: the first step took %.1f s, compilation included", first_step_s)

            if state.step % cfg.train.log_every == 0 or state.step == last_step or skipped:
                record = {
                    "step": state.step,
                    "epoch": epoch,
                    **logged_values(loss, output.metrics, env),
                    "lr": lr,
                    "samples_per_s": cfg.data.batch_size / (time.perf_counter() - started),
                }
                if state.skipped_steps:
                    record.update(skipped=skipped, skipped_steps=state.skipped_steps)
                if first_step_s is not None:
                    record["first_step_s"], first_step_s = first_step_s, None
                log.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.train.steps:
                if env.is_main:
                    log.log_eval(state.step, evaluate_student(cfg, student_bundle, built.eval_set, progress=False))
                barrier()
            signum = stop_requested(stop, env)
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            if checkpoint_due or state.step == last_step or signum:
                saved = save(state, built, cfg, run, env)
                barrier()
            if signum:
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(signum).name} after step {state.step}: checkpoint "
                    f"{saved or run.checkpoints}; run the same command with --resume latest to continue",
                    signum,
                )
        bar.close()
        final: dict = {}
        if state.step == cfg.train.steps:
            check_finite_student(built, state.step, run)  # on every process: none left waiting
        if env.is_main and state.step == cfg.train.steps:
            ckpt.save_model_file(run.model, merged_student_state(student_bundle))
            if cfg.eval.final:
                final = evaluate_student(cfg, student_bundle, built.eval_set, progress=progress)
                log.log_eval(state.step, final)
                atomic_write_text(run.final_eval, json.dumps(final, indent=2))
    finally:
        bar.close()
        log.close()
    barrier()
    return final
