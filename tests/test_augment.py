"""Training augmentation (``mmtard.data.augment``): shape, range, seeding, and the geometry of the crop and flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtard.data.augment import CropBoxes, TrainAugment, resized_crop, step_generator
from mmtard.errors import ConfigError


def _images(batch: int = 6, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_batch_and_single_image_keep_shape_dtype_and_range():
    augment = TrainAugment()
    x = _images()
    out = augment(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    single = augment(x[0], generator=torch.Generator().manual_seed(1))
    assert single.shape == x[0].shape and 0 <= single.min() and single.max() <= 1


def test_same_seed_same_output_other_seed_other_output():
    augment = TrainAugment()
    x = _images()
    first = augment(x, generator=torch.Generator().manual_seed(3))
    again = augment(x, generator=torch.Generator().manual_seed(3))
    other = augment(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, x)


def test_each_image_of_a_batch_gets_its_own_box():
    boxes = TrainAugment().sample_boxes(64, 224, 224, generator=torch.Generator().manual_seed(0))
    assert len({(int(t), int(left), int(h), int(w)) for t, left, h, w in zip(*_box_columns(boxes))}) > 32
    assert 0 < int(boxes.flip.sum()) < 64


def _box_columns(boxes: CropBoxes):
    return boxes.top, boxes.left, boxes.height, boxes.width


def test_boxes_follow_scale_and_ratio_and_fit_the_image():
    augment = TrainAugment(scale=(0.5, 0.9), ratio=(0.8, 1.25))
    boxes = augment.sample_boxes(500, 40, 30, generator=torch.Generator().manual_seed(0))
    area = (boxes.height * boxes.width).double() / (40 * 30)
    assert (boxes.top >= 0).all() and (boxes.left >= 0).all()
    assert (boxes.top + boxes.height <= 40).all() and (boxes.left + boxes.width <= 30).all()
    # integer rounding of the box sides moves the area and ratio a little beyond the drawn ones
    assert area.min() > 0.5 - 0.05 and area.max() < 0.9 + 0.05
    aspect = boxes.width.double() / boxes.height.double()
    assert aspect.min() > 0.8 - 0.06 and aspect.max() < 1.25 + 0.06
    assert boxes.top.unique().numel() > 3 and boxes.left.unique().numel() > 3


def test_no_crop_no_flip_is_the_identity_and_flip_mirrors():
    x = _images(3)
    keep = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(keep(x), x, atol=1e-5, rtol=0)
    mirror = TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(mirror(x), torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)


def test_a_box_is_resized_as_bicubic_interpolation_of_the_crop():
    """Away from the box's edges (where grid_sample reads the true neighbours and interpolate repeats the
    border), the resized box is F.interpolate's bicubic upsampling of the cropped pixels."""
    x = _images(1, size=32)
    one = torch.tensor([1])
    boxes = CropBoxes(top=one * 4, left=one * 8, height=one * 16, width=one * 16, flip=torch.tensor([False]))
    out = resized_crop(x, boxes)
    expected = F.interpolate(x[:, :, 4:20, 8:24], size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4], atol=1e-5, rtol=0)


def test_step_generator_is_a_function_of_seed_step_and_rank():
    def draw(*key):
        return torch.rand(4, generator=step_generator(*key))

    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scale": (0.0, 1.0)}, "augment.scale"),
        ({"scale": (0.9, 0.5)}, "augment.scale"),
        ({"ratio": (2.0, 1.0)}, "augment.ratio"),
        ({"flip_p": 1.5}, "augment.flip_p"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainAugment(**settings)
