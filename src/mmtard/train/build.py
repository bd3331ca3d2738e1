"""Builders of a training run: precision, student, datasets, teachers, optimizer and compilation.

Each reads the run config and returns what it builds; none writes a file. ``train`` calls them in order
(:func:`mmtard.train.trainer.build_run`).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from mmtard import preflight
from mmtard.data import ImageDataset, create_dataset
from mmtard.distributed import AUTOCAST_DTYPES
from mmtard.errors import ConfigError
from mmtard.methods import Method
from mmtard.models import CLIPBundle, ZeroShotClassifier
from mmtard.train.config import RunConfig

logger = logging.getLogger(__name__)


def build_precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA when supported, fp32 on CPU."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"train.precision: {precision} needs a CUDA device; use fp32 (or auto) on {device.type}")
    return AUTOCAST_DTYPES[precision]


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
            data.dataset,
            data.dir,
            split=data.split,
            classes=data.classes,
            samples=data.samples,
            part=data.part,
            **common,
        )
    with preflight.renamed_fields(data_fields("eval_")):
        eval_set = create_dataset(
            data.dataset,
            data.dir,
            split=data.eval_split,
            classes=data.eval_classes,
            samples=data.eval_samples,
            part=data.eval_part,
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
        "part": f"data.{prefix}part",
    }


def build_teachers(cfg: RunConfig, method: Method, student: CLIPBundle, dataset: ImageDataset, device) -> nn.ModuleDict:
    """The method's frozen teachers on the training label set (:meth:`Method.build_teachers`), by name; the method
    keeps them (``method.teachers``)."""
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


def compile_models(student: ZeroShotClassifier, method: Method) -> None:
    """``torch.compile`` the classifiers a training step calls (``train.compile``), in place
    (``nn.Module.compile``): the student, then the method's teachers (:meth:`Method.compile_teachers`).
    Parameters, state-dict names and checkpoints stay as they are, and the held-out evaluation, which builds its
    own classifier on the student's tower, runs eagerly. ``dynamic=False``: the step's shapes are fixed
    (``drop_last``), so each gets its own static graph."""
    student.compile(dynamic=False)
    method.compile_teachers()
