"""The training loop: one code path for one CPU process and for ``torchrun`` on many GPUs.

``train(config)`` reads as a few ``build_*`` calls and a loop. Everything that must survive a resume
lives in ``TrainState`` and goes into each checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from mmtard.attacks import create_attack
from mmtard.data import ImageDataset, create_dataset
from mmtard.errors import ConfigError
from mmtard.eval.zeroshot import evaluate_classifier
from mmtard.fileio import atomic_write_text
from mmtard.methods import Method, create_method, freeze
from mmtard.models import CLIPBundle, ZeroShotClassifier, build_zero_shot_classifier, load_clip
from mmtard.train import checkpoint as ckpt
from mmtard.train.config import RunConfig, save_config
from mmtard.train.distributed import DistEnv, all_reduce_mean, barrier, gather_objects, init_distributed
from mmtard.train.rundir import RunDir, read_jsonl

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
    data = cfg.data
    common = dict(image_size=image_size, seed=seed)
    train_set = create_dataset(
        data.dataset, data.dir, split=data.split, classes=data.classes, samples=data.samples, **common
    )
    eval_set = create_dataset(
        data.dataset, data.dir, split=data.eval_split, classes=data.eval_classes, samples=data.eval_samples, **common
    )
    return train_set, eval_set


def build_teachers(
    cfg: RunConfig, method: Method, student: CLIPBundle, dataset: ImageDataset, device
) -> dict[str, ZeroShotClassifier]:
    """Frozen classifiers for every role the method needs; ``original`` is a copy of the starting student."""
    teachers = {}
    for role in method.teacher_roles:
        if role == "original":
            bundle = copy.copy(student)
            bundle.model = copy.deepcopy(student.model)
            bundle._prototype_cache = dict(student._prototype_cache)
        else:
            spec = cfg.teachers[role]
            bundle = load_clip(spec.arch, spec.pretrained, device=device, trust_checkpoint=spec.trust_checkpoint)
        freeze(bundle.model)
        teachers[role] = build_zero_shot_classifier(
            bundle, dataset.classnames, dataset.templates, cfg.method.logit_scale
        )
        freeze(teachers[role])
    return teachers


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
    if global_batch % env.world_size:
        raise ConfigError(
            f"data.batch_size: the global batch {global_batch} must divide by the {env.world_size} processes"
        )
    local_batch = global_batch // env.world_size
    per_epoch = len(dataset) // global_batch
    if per_epoch == 0:
        raise ConfigError(f"data.batch_size: {global_batch} is larger than the {len(dataset)} training images")
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


def global_metrics(metrics: dict, env: DistEnv) -> dict:
    """The step's metrics over the global batch: the mean over processes of each one's value (the batch
    accuracies are per shard; terms the method already averaged across processes are unchanged)."""
    if not env.distributed:
        return metrics
    names = [name for name, value in metrics.items() if isinstance(value, (int, float))]
    means = all_reduce_mean(
        torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=env.device)
    )
    return {**metrics, **dict(zip(names, means.tolist()))}


def evaluate_student(cfg: RunConfig, bundle: CLIPBundle, eval_set: ImageDataset, progress: bool) -> dict:
    """Clean and PGD robust accuracy of the student on the held-out split, through the evaluation code."""
    classifier = build_zero_shot_classifier(bundle, eval_set.classnames, eval_set.templates, cfg.method.logit_scale)
    attacks = [
        create_attack(cfg.eval.attack, eps=eps, steps=cfg.eval.steps, seed=cfg.train.seed) for eps in cfg.eval.eps
    ]
    return evaluate_classifier(
        classifier, eval_set, attacks, batch_size=cfg.eval.batch_size, progress=progress
    ).to_dict()


def save(state: TrainState, bundle: CLIPBundle, cfg: RunConfig, run: RunDir, env: DistEnv) -> Path | None:
    """Write a checkpoint from rank 0; every process must call it (it gathers each one's RNG state)."""
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
    grad_clip: float | None,
):
    """One optimizer step: the method's loss under autocast, backward, clipping, update. Returns
    ``(loss, MethodOutput)``. A non-finite loss stops every process (the check is agreed across ranks, so
    none is left waiting in an all-reduce)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = state.method(state.student, teachers, x, y, index)
    loss = output.total()
    if all_reduce_mean(torch.isfinite(loss.detach()).float()).item() < 1:
        raise FloatingPointError(
            f"step {state.step + 1}: the loss is not finite on some process (here {loss.item()}, "
            f"terms {output.metrics}); lower train.lr or check the teachers"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if grad_clip:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.step += 1
    return loss, output


def train(cfg: RunConfig, resume: str | None = None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the student of ``cfg``; returns the final evaluation (rank 0) or ``{}``.

    Args:
        cfg: the validated run config.
        resume: ``latest`` or a checkpoint folder to continue from.
        stop_after: stop (with a checkpoint) after this many steps of this invocation, e.g. to fit a
            job's time slot; ``--resume latest`` continues.
        progress: show tqdm bars on rank 0.
    """
    env = init_distributed(cfg.device)
    run = RunDir(cfg.output_dir)
    torch.manual_seed(cfg.train.seed)  # the same random initial weights on every process
    if env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)

    student_bundle = load_clip(
        cfg.student.arch, cfg.student.pretrained, device=env.device, trust_checkpoint=cfg.student.trust_checkpoint
    )
    train_set, eval_set = build_datasets(cfg, student_bundle.image_size, cfg.train.seed)
    method = create_method(cfg.method)
    method.mean_across_processes = all_reduce_mean
    teachers = build_teachers(cfg, method, student_bundle, train_set, env.device)
    build_student(cfg, student_bundle)
    student = build_zero_shot_classifier(
        student_bundle, train_set.classnames, train_set.templates, cfg.method.logit_scale
    )
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params)
    autocast_dtype = build_precision(cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=autocast_dtype == torch.float16)
    torch.manual_seed(cfg.train.seed + env.rank)  # each process its own attack random starts
    wrapped = (
        DistributedDataParallel(student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.distributed
        else student
    )
    state = TrainState(0, wrapped, optimizer, scheduler, scaler, method)

    if resume:
        restore(state, student_bundle, ckpt.resolve_resume(run.path, resume), cfg, env)
        logger.info("resumed from step %d", state.step)
    log = MetricsLog(run, env.is_main, state.step)
    last_step = cfg.train.steps if stop_after is None else min(cfg.train.steps, state.step + stop_after)
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        desc=f"train {cfg.method.name}",
        disable=not (progress and env.is_main),
    )
    stream = batches(train_set, cfg, env, state.step)
    while state.step < last_step:
        started = time.perf_counter()
        epoch, (x, y, index) = next(stream)
        x, y, index = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True), index.to(env.device)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        loss, output = train_step(state, teachers, x, y, index, autocast_dtype, params, cfg.train.grad_clip)
        bar.update(1)

        if state.step % cfg.train.log_every == 0 or state.step == last_step:
            seconds = time.perf_counter() - started
            record = {
                "step": state.step,
                "epoch": epoch,
                "loss": all_reduce_mean(loss.detach()).item(),
                **global_metrics(output.metrics, env),
                "lr": lr,
                "samples_per_s": cfg.data.batch_size / seconds,
            }
            log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.train.steps:
            if env.is_main:
                log.log_eval(state.step, evaluate_student(cfg, student_bundle, eval_set, progress=False))
            barrier()
        if (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0) or state.step == last_step:
            save(state, student_bundle, cfg, run, env)
            barrier()
    bar.close()

    final: dict = {}
    if env.is_main and state.step == cfg.train.steps:
        ckpt.save_model_file(run.model, merged_student_state(student_bundle))
        if cfg.eval.final:
            final = evaluate_student(cfg, student_bundle, eval_set, progress=progress)
            log.log_eval(state.step, final)
            atomic_write_text(run.final_eval, json.dumps(final, indent=2))
    log.close()
    barrier()
    return final
