"""Transforms keep pixel-level traces: no resizing of big-enough images, upscale-only for small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ntf_ray.images.transforms import (
    Stage1Views,
    Stage2Transform,
    TooLargeToFit,
    eval_transform,
    fit_min_side,
    gaussian_blur,
    perturb,
    to_tensor,
)


def img(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_to_tensor_layout():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    a.setflags(write=False)
    t = to_tensor(a)
    assert t.shape == (3, 2, 3) and t.dtype == torch.uint8 and t[:, 1, 2].tolist() == a[1, 2].tolist()
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 4), np.uint8))


def test_eval_crop_is_native_resolution_centre_crop():
    x = img(300, 400)
    out = eval_transform(x, 224)
    top, left = (300 - 224) // 2, (400 - 224) // 2
    assert torch.equal(out, x[:, top : top + 224, left : left + 224])


@pytest.mark.parametrize("h,w", [(50, 40), (100, 300), (224, 10)])
def test_small_images_are_upscaled_not_padded(h, w):
    x = torch.full((3, h, w), 200, dtype=torch.uint8)
    out = eval_transform(x, 224)
    assert out.shape == (3, 224, 224)
    assert (out == 200).all()  # zero padding would leave black borders


def test_fit_min_side_keeps_aspect_and_leaves_big_images():
    x = img(100, 300)
    assert fit_min_side(x, 224).shape == (3, 224, 672)
    big = img(230, 240)
    assert fit_min_side(big, 224) is big


@pytest.mark.parametrize("make", [
    lambda limit: Stage1Views(224, max_pixels=limit),
    lambda limit: Stage2Transform(224, 32, blur_prob=1.0, jpeg_prob=1.0, seed=0, max_pixels=limit),
], ids=["stage1", "stage2"])
def test_training_transforms_refuse_slivers_whose_upscale_passes_the_limit(make):
    # 1 x 1000 upscaled until its short side is 224: 224 x 224000 = 50,176,000 px.
    thin = img(1, 1000)
    with pytest.raises(TooLargeToFit, match=r"^too_large: upscaling 1000x1 to fit 224 px needs "
                                            r"224000x224 = 50176000 px > limit 10000000$"):
        make(10_000_000)(thin)
    with pytest.raises(TooLargeToFit, match="upscaling 1x1000"):
        make(10_000_000)(img(1000, 1))
    # Within the limit, or with none, it is upscaled as before; a big image is never refused.
    assert make(60_000_000)(thin)[0].shape[-2:] == (224, 224)
    assert make(None)(thin)[0].shape[-2:] == (224, 224)
    assert make(224 * 224 - 1)(img(230, 240))[0].shape[-2:] == (224, 224)


@pytest.mark.parametrize("h,w", [(1, 200), (2, 200), (200, 1)])
def test_blur_of_a_sliver_blurs_along_its_long_side(h, w):
    # sigma 2: a 13-pixel kernel, more than reflect padding allows across 1 or 2 pixels.
    x = img(h, w)
    out = gaussian_blur(x, 2.0)
    assert out.shape == x.shape and out.float().std() < x.float().std()


def test_the_sliver_limit_is_the_scorers():
    """Training refuses exactly the images the scorer refuses, with the same reason."""
    from ntf_ray.detector.scorer import Scorer
    from ntf_ray.nn.model import Detector

    scorer = Scorer(Detector.build("tiny"), input_size=48, max_pixels=100_000, device="cpu")
    for h, w in [(1, 2000), (1, 2100), (2, 4200), (3000, 1), (40, 2100), (48, 5000)]:
        _, result = scorer.crop(img(h, w), "png", "pil")
        try:
            Stage1Views(48, max_pixels=100_000)(img(h, w))
            refused = None
        except TooLargeToFit as exc:
            refused = str(exc)
        assert refused == result.error, (h, w)


def test_stage1_views_shapes_and_differ():
    torch.manual_seed(0)
    v1, v2 = Stage1Views(32, resized_crop=True)(img(64, 80))
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.uint8
    assert not torch.equal(v1, v2)
    n1, n2 = Stage1Views(32, resized_crop=False, jitter=0, grayscale_prob=0)(img(64, 80))
    assert n1.shape == (3, 32, 32)


def test_stage1_native_crop_without_colour_is_a_pure_crop():
    torch.manual_seed(1)
    x = img(40, 40)
    v1, _ = Stage1Views(40, resized_crop=False, jitter=0, grayscale_prob=0)(x)
    assert torch.equal(v1, x) or torch.equal(v1, x.flip(-1))


def test_stage2_transform_deterministic_by_seed_and_scl_crop_inside():
    x = img(64, 64)
    a1, c1 = Stage2Transform(48, 16, blur_prob=0.5, jpeg_prob=0.5, seed=3)(x)
    a2, c2 = Stage2Transform(48, 16, blur_prob=0.5, jpeg_prob=0.5, seed=3)(x)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert a1.shape == (3, 48, 48) and c1.shape == (3, 16, 16)
    # The SCL crop is a window of the classifier crop.
    windows = a1.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 33, 33, 16, 16)
    assert any(torch.equal(windows[:, i, j], c1) for i in range(33) for j in range(33))


def test_stage2_without_augmentation_is_crop_and_flip():
    x = img(50, 50)
    crop, _ = Stage2Transform(50, 8, blur_prob=0, jpeg_prob=0, seed=0)(x)
    assert torch.equal(crop, x) or torch.equal(crop, x.flip(-1))


def test_perturbations():
    x = img(64, 64)
    assert torch.equal(perturb(x, "blur", 0), x)
    blurred = perturb(x, "blur", 2.0)
    assert blurred.float().std() < x.float().std()
    assert perturb(x, "jpeg", 30).shape == x.shape
    low = (perturb(x, "jpeg", 10).float() - x.float()).abs().mean()
    high = (perturb(x, "jpeg", 95).float() - x.float()).abs().mean()
    assert high < low
    noisy = perturb(x, "noise", 0.1, torch.Generator().manual_seed(0))
    assert 10 < (noisy.float() - x.float()).std() < 35  # ~25.5 before clipping
    assert perturb(x, "downscale", 0.5).shape == (3, 32, 32)
    assert perturb(x, "downscale", 0.2).shape == (3, 13, 13)
    with pytest.raises(ValueError):
        perturb(x, "downscale", 0)
    with pytest.raises(ValueError):
        perturb(x, "sharpen", 1)


class _Crops(torch.utils.data.Dataset):
    """Every item: the same image through the stage-2 transform, so only its random draws vary."""

    def __init__(self, transform):
        self.transform, self.image = transform, img(64, 64, seed=3)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        crop, small = self.transform(self.image)
        return torch.cat([crop.flatten(), small.flatten()])


def _draws(workers: int, loader_seed: int) -> list[torch.Tensor]:
    t = Stage2Transform(32, 8, blur_prob=0.5, jpeg_prob=0.5, seed=7)
    # Spawned workers: forking the test process, which by now holds the threads of Ray's driver and
    # of the S3 server, can hand a worker a heap another thread was changing ("double free" in CI).
    context = "spawn" if workers else None
    loader = torch.utils.data.DataLoader(_Crops(t), batch_size=4, num_workers=workers, multiprocessing_context=context,
                                         generator=torch.Generator().manual_seed(loader_seed))
    return [row for batch in loader for row in batch]


def test_stage2_draws_differ_per_dataloader_worker_and_repeat_per_seed():
    # Worker k gets batches k, k + W, ...: with W = 2, batches 0 and 1 come from different workers.
    two = _draws(2, loader_seed=0)
    first_batches = two[:4], two[4:8]
    assert not all(torch.equal(a, b) for a, b in zip(*first_batches)), "two workers repeated each other's draws"
    assert all(torch.equal(a, b) for a, b in zip(two, _draws(2, loader_seed=0)))  # seeded: reproducible
    assert not all(torch.equal(a, b) for a, b in zip(two, _draws(2, loader_seed=1)))
    # In the main process the transform's own seed sets the stream.
    assert all(torch.equal(a, b) for a, b in zip(_draws(0, 0), _draws(0, 5)))


@pytest.mark.parametrize("hw", [(50, 997), (1000, 100), (7, 3001), (2000, 60), (100, 223 * 5)])
def test_a_thin_image_is_cropped_before_it_is_upscaled(hw, monkeypatch):
    from ntf_ray.images import transforms

    g = torch.Generator().manual_seed(sum(hw))
    img = torch.randint(0, 256, (3, *hw), generator=g, dtype=torch.uint8)
    whole = TF.center_crop(transforms.fit_min_side(img, 224), [224, 224])  # the whole frame upscaled, then cropped
    sizes = []
    real_resize = TF.resize
    monkeypatch.setattr(transforms.TF, "resize", lambda x, size, **kw: sizes.append(size) or real_resize(x, size, **kw))
    crop = transforms.eval_transform(img, 224)
    assert sizes == []  # the upscaled frame is never made
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
    diff = (crop.int() - whole.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05  # the same bilinear pixels, to rounding


def test_a_small_image_that_is_not_thin_keeps_the_exact_upscale():
    from ntf_ray.images import transforms

    img = torch.randint(0, 256, (3, 150, 200), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(transforms.eval_transform(img, 224),
                       TF.center_crop(transforms.fit_min_side(img, 224), [224, 224]))
