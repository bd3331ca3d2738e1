"""Training augmentation on ``[0, 1]`` image tensors: open_clip's random resized crop, plus a horizontal flip.

open_clip's train transform (``open_clip.transform.image_transform(is_train=True)``) is
``RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)`` on PIL images; MMT-ARD's paper
configs add a horizontal flip. Here both act on tensors that are already at the model's size (the datasets
of :mod:`mmtard.data` resize and centre-crop), so the transform runs per batch on the GPU after the
transfer, or per sample in a DataLoader worker:

- the crop box is drawn as torchvision draws it: an area fraction uniform in ``scale``, an aspect ratio
  log-uniform in ``ratio``, up to 10 tries, then the largest central box within ``ratio``; integer pixels;
- the box is resized back to the input size by bicubic sampling (one ``grid_sample`` call for the whole
  batch, pixel centres as ``F.interpolate(align_corners=False)``), flipped with probability ``flip_p``,
  and clamped to ``[0, 1]`` (bicubic overshoots).

Randomness comes from a ``torch.Generator`` (drawn on the CPU, so a seed gives the same boxes on every
device); :func:`step_generator` derives one per training step, so a resumed run redraws exactly the boxes
of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtard.errors import ConfigError
from mmtard.validate import MAX_SEED

#: tries at a random box before the central fallback (torchvision's RandomResizedCrop)
CROP_TRIES = 10


@dataclass(frozen=True)
class CropBoxes:
    """Per-image crop boxes in pixels: ``top``, ``left``, ``height``, ``width`` and ``flip``, each ``(B,)``."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


@dataclass(frozen=True)
class TrainAugment:
    """Random resized crop (open_clip's train transform) and horizontal flip of ``[0, 1]`` images.

    Args:
        scale: range of the crop's area as a fraction of the image's (open_clip: ``(0.9, 1.0)``).
        ratio: range of the crop's width / height (torchvision: ``(3/4, 4/3)``).
        flip_p: probability of a horizontal flip per image.

    Raises:
        ConfigError: ``scale`` not within ``(0, 1]`` and ordered, ``ratio`` not positive and ordered, or
            ``flip_p`` outside ``[0, 1]``.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"augment.scale: expected 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"augment.ratio: expected 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_p <= 1:
            raise ConfigError(f"augment.flip_p: expected a probability in [0, 1], got {self.flip_p}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented copies of ``images``, ``(3, H, W)`` or ``(B, 3, H, W)`` in ``[0, 1]``, same shape and dtype.

        Args:
            images: one image or a batch; every image of a batch gets its own box and flip.
            generator: a CPU generator for the boxes and flips (the global RNG when None).
        """
        single = images.dim() == 3
        batch = images[None] if single else images
        if batch.dim() != 4:
            raise ValueError(f"expected (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
        boxes = self.sample_boxes(len(batch), *batch.shape[-2:], generator=generator)
        out = resized_crop(batch, boxes)
        return out[0] if single else out

    def sample_boxes(self, count: int, height: int, width: int, generator: torch.Generator | None = None) -> CropBoxes:
        """``count`` crop boxes for ``height x width`` images, drawn as torchvision's RandomResizedCrop does."""
        area = height * width
        target = area * torch.empty(count, CROP_TRIES).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(count, CROP_TRIES).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator
        )
        aspect = log_ratio.exp()
        box_w = (target * aspect).sqrt().round().long()
        box_h = (target / aspect).sqrt().round().long()
        fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
        first = fits.long().argmax(dim=1)  # the first try that fits (0 when none does: replaced below)
        found = fits.any(dim=1)
        rows = torch.arange(count)
        fallback_h, fallback_w = self._central_box(height, width)
        box_h = torch.where(found, box_h[rows, first], fallback_h)
        box_w = torch.where(found, box_w[rows, first], fallback_w)
        # uniform integer offsets in [0, size - box], as torch.randint(0, size - box + 1) per image
        top = (torch.rand(count, generator=generator) * (height - box_h + 1)).floor().long()
        left = (torch.rand(count, generator=generator) * (width - box_w + 1)).floor().long()
        top = torch.where(found, top, (height - box_h) // 2)
        left = torch.where(found, left, (width - box_w) // 2)
        flip = torch.rand(count, generator=generator) < self.flip_p
        return CropBoxes(top, left, box_h, box_w, flip)

    def _central_box(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's fallback: the whole image, narrowed to the nearest ratio bound when outside ``ratio``."""
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return round(width / self.ratio[0]), width
        if in_ratio > self.ratio[1]:
            return height, round(height * self.ratio[1])
        return height, width


def resized_crop(images: torch.Tensor, boxes: CropBoxes) -> torch.Tensor:
    """Each image's box resized (bicubic) to the images' size, flipped where ``boxes.flip``, in ``[0, 1]``."""
    batch, _, height, width = images.shape
    scale_x = boxes.width.double() / width
    scale_y = boxes.height.double() / height
    # the box's centre in grid_sample's coordinates (-1 and 1 are the image's outer pixel edges)
    centre_x = (2 * boxes.left + boxes.width).double() / width - 1
    centre_y = (2 * boxes.top + boxes.height).double() / height - 1
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(boxes.flip, -scale_x, scale_x)
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = scale_y
    theta[:, 1, 2] = centre_y
    compute = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    theta = theta.to(images.device, compute)
    grid = F.affine_grid(theta, [batch, images.shape[1], height, width], align_corners=False)
    out = F.grid_sample(images.to(compute), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1).to(images.dtype)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for the augmentation of one training step of one process: the same ``(seed, step,
    rank)`` always gives the same boxes, so a resumed run augments as the uninterrupted one did."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) % (MAX_SEED + 1))
