"""augmentations.py: DataAugmentationDINO against the official DINO augmentation (tests/official_dino.py).

Our pipeline computes the crops on tensors, but draws its random parameters with the same calls, in the
same order, as the official torchvision/PIL transforms: under the same seed every parameter (crop box,
flip, jitter order and factors, grayscale, blur radius, solarization) is the official one, and the images
differ by rounding only. Also: the statistics of the parameters (crop scale and aspect ratio, application
probabilities, jitter ranges), the pixel operations against PIL's, shapes, dtypes and normalisation, and
per-sample determinism, and how often each pixel operation runs. CPU only, generated images, a few seconds.
"""
import collections
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

import augmentations
import data
import official_dino as official
from conftest import noise_image

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)  # written out, not read from augmentations.py
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)


def smooth_image(size=(64, 48), seed=0):
    """A photo-like RGB image: colour gradients, a few discs, mild noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 200 + 30, yy / h * 180 + 40, (xx + yy) / (w + h) * 150 + 60], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 12)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def small_aug(n_local=2, global_size=64, local_size=32):
    return augmentations.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, n_local, global_crops_size=global_size,
                                              local_crops_size=local_size)


def augs(n_local=4, global_size=32, local_size=16):
    kw = dict(global_crops_size=global_size, local_crops_size=local_size)
    return (augmentations.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, n_local, **kw),
            official.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, n_local, **kw))


def record_ours(aug, monkeypatch):
    """The CropParams our transforms draw, in call order."""
    drawn = []
    for name in ("global_transfo1", "global_transfo2", "local_transfo"):
        transform = getattr(aug, name)

        def sample(height, width, real=transform.sample):
            drawn.append(real(height, width))
            return drawn[-1]
        monkeypatch.setattr(transform, "sample", sample)
    return drawn


def record_official(monkeypatch):
    """The parameters the official transforms use, one dict per crop, in order (from spies on the
    torchvision parameter functions and the PIL operations)."""
    crops = []
    real_crop, real_jitter = transforms.RandomResizedCrop.get_params, transforms.ColorJitter.get_params
    real_hflip, real_gray = TF.hflip, TF.rgb_to_grayscale
    real_blur, real_solarize = ImageFilter.GaussianBlur, ImageOps.solarize

    def crop(img, scale, ratio):
        box = real_crop(img, scale, ratio)
        crops.append(dict(box=tuple(box), flip=False, jitter=None, gray=False, blur=None, solarize=False))
        return box

    def jitter(*ranges):
        order, b, c, s, h = real_jitter(*ranges)
        crops[-1]["jitter"] = (order.tolist(), b, c, s, h)
        return order, b, c, s, h

    def hflip(img):
        crops[-1]["flip"] = True
        return real_hflip(img)

    def gray(img, *a, **k):
        crops[-1]["gray"] = True
        return real_gray(img, *a, **k)

    def blur(radius=2):
        crops[-1]["blur"] = radius
        return real_blur(radius=radius)

    def solarize(img, *a, **k):
        crops[-1]["solarize"] = True
        return real_solarize(img, *a, **k)

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(crop))
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(jitter))
    monkeypatch.setattr(TF, "hflip", hflip)
    monkeypatch.setattr(TF, "rgb_to_grayscale", gray)
    monkeypatch.setattr(official.ImageFilter, "GaussianBlur", blur)
    monkeypatch.setattr(official.ImageOps, "solarize", solarize)
    return crops


def as_dict(p: augmentations.CropParams):
    jitter = None if p.jitter is None else (list(p.jitter[0]),) + tuple(p.jitter[1:])
    return dict(box=tuple(p.box), flip=p.flip, jitter=jitter, gray=p.gray, blur=p.blur, solarize=bool(p.solarize))


# ----------------------------------------------------------------------------------------------------
# Same parameters as the official pipeline, seed by seed
# ----------------------------------------------------------------------------------------------------
def test_parameters_are_the_official_ones(monkeypatch):
    """90 images of 6 sizes (very elongated ones take RandomResizedCrop's central-crop fallback), 6 crops
    each: every parameter of every crop equals the official one under the same per-sample seed."""
    ours, off = augs(n_local=4)
    drawn = record_ours(ours, monkeypatch)
    crops = record_official(monkeypatch)
    sizes = [(64, 48), (48, 64), (40, 40), (300, 20), (20, 300), (97, 61)]
    for k in range(90):
        img = noise_image(sizes[k % len(sizes)], seed=k)
        with data.seeded_rng(data.sample_seed(3, 1, k)):
            ours(img)
        with data.seeded_rng(data.sample_seed(3, 1, k)):
            off(img)
    assert len(drawn) == len(crops) == 90 * 6
    for i, (mine, theirs) in enumerate(zip(drawn, crops)):
        assert as_dict(mine) == theirs, (i, mine, theirs)
    # the comparison covers every branch
    assert {c["flip"] for c in crops} == {True, False} and {c["gray"] for c in crops} == {True, False}
    assert any(c["solarize"] for c in crops) and any(c["blur"] is None for c in crops)
    assert any(c["jitter"] is None for c in crops) and any(c["jitter"] is not None for c in crops)
    # 300 x 20: no global crop fits (scale >= 0.4, ratio <= 4/3), so the central 27 x 20 crop
    elongated = [k for k in range(90) if sizes[k % len(sizes)] == (300, 20)]
    assert all(crops[6 * k + i]["box"] == (0, 136, 20, 27) for k in elongated for i in (0, 1))


@pytest.mark.parametrize("make_image", [smooth_image, noise_image], ids=["smooth", "noise"])
def test_crops_equal_the_official_ones_up_to_rounding(make_image):
    """Same seed, same image: each crop differs from the official one by rounding only (PIL rounds after
    every operation, to 8 bits, and its hue goes through 8-bit HSV): small mean absolute difference, no
    bias, a few levels at most."""
    ours, off = augs(n_local=4, global_size=64, local_size=32)
    diffs = []
    for k in range(12):
        img = make_image((80, 64), seed=k)
        with data.seeded_rng(k):
            a = ours(img)
        with data.seeded_rng(k):
            b = off(img)
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
            diffs.append(((x - y) * STD * 255).flatten())
    d = torch.cat(diffs)
    assert d.abs().mean() < 1.0, d.abs().mean()  # 8-bit levels
    assert d.mean().abs() < 0.25, d.mean()
    assert (d.abs() > 3.5).float().mean() < 0.03
    assert d.abs().max() <= 24


# ----------------------------------------------------------------------------------------------------
# Statistics of the parameters
# ----------------------------------------------------------------------------------------------------
def ks_two_sample(a, b) -> float:
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                        - np.searchsorted(b, grid, side="right") / len(b)).max())


def draw_many(transform, n, height=200, width=160, seed0=0):
    out = []
    for k in range(n):
        with data.seeded_rng(seed0 + k):
            out.append(transform.sample(height, width))
    return out


@pytest.mark.parametrize("scale", [GLOBAL_SCALE, LOCAL_SCALE])
def test_crop_scale_and_aspect_ratio_distribution(scale):
    """Crop area fraction in the scale range, and ~ Uniform(scale) with log aspect ratio ~ Uniform(log 3/4,
    log 4/3) when every draw fits (local crops; up to the rounding of the sides); area, aspect ratio and
    position have the distribution of torchvision's RandomResizedCrop.get_params drawn with other seeds
    (two-sample Kolmogorov-Smirnov)."""
    n, height, width = 3000, 200, 160
    ours = draw_many(augmentations.CropAugmentation(96, scale, blur_p=0.5), n, height, width)
    theirs = []
    for k in range(n):
        with data.seeded_rng(10 ** 6 + k):
            theirs.append(transforms.RandomResizedCrop.get_params(torch.empty(3, height, width), scale,
                                                                  (3 / 4, 4 / 3)))
    area = np.array([p.box[2] * p.box[3] / (height * width) for p in ours])
    log_ratio = np.array([math.log(p.box[3] / p.box[2]) for p in ours])
    tol = 0.02  # rounding the sides to whole pixels
    assert area.min() >= scale[0] - tol and area.max() <= scale[1] + tol
    assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.05
    assert all(0 <= p.box[0] <= height - p.box[2] and 0 <= p.box[1] <= width - p.box[3] for p in ours)
    if scale == LOCAL_SCALE:  # every draw fits in the image: no rejection, the drawn distributions themselves
        # against the continuous uniform distributions: KS distance small (n = 3000: 1.63 / sqrt(n) = 0.03)
        grid = np.sort(area)
        cdf = np.clip((grid - scale[0]) / (scale[1] - scale[0]), 0, 1)
        assert np.abs(np.arange(1, n + 1) / n - cdf).max() < 0.04
        grid = np.sort(log_ratio)
        cdf = np.clip((grid + math.log(4 / 3)) / (2 * math.log(4 / 3)), 0, 1)
        assert np.abs(np.arange(1, n + 1) / n - cdf).max() < 0.05
    # (global crops: large draws that do not fit are drawn again, which skews both distributions, in
    # torchvision as here)
    for field in (lambda b: b[2] * b[3], lambda b: b[3] / b[2], lambda b: b[0], lambda b: b[1]):
        # two independent samples of the same distribution: KS distance below the 0.1% critical value
        assert ks_two_sample([field(p.box) for p in ours], [field(b) for b in theirs]) < 1.95 * math.sqrt(2 / n)


def test_jitter_ranges_are_torchvisions():
    """augmentations.py computes ColorJitter(0.4, 0.4, 0.2, 0.1)'s ranges itself (it does not import
    torchvision): the same floats as torchvision's, so that the factors drawn from them are the official ones."""
    jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    expected = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    assert augmentations.CropAugmentation(32, GLOBAL_SCALE, blur_p=0.5).jitter_ranges == expected


def binomial_ok(count, n, p, sigmas=5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_application_probabilities_and_jitter_ranges():
    """Flip 0.5, jitter 0.8, grayscale 0.2 on every crop; blur 1.0 / 0.1 / 0.5 and solarization 0 / 0.2 / 0
    on g1 / g2 / locals; jitter factors uniform in [0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]; the 24
    orders of the four jitter operations equally likely; blur radius uniform in [0.1, 2]."""
    n = 4000
    aug = augmentations.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 8)
    kinds = {"g1": (aug.global_transfo1, 1.0, 0.0), "g2": (aug.global_transfo2, 0.1, 0.2),
             "local": (aug.local_transfo, 0.5, 0.0)}
    jitters, radii = [], []
    for seed0, (name, (transform, blur_p, solarize_p)) in enumerate(kinds.items()):
        params = draw_many(transform, n, seed0=seed0 * n)
        counts = collections.Counter()
        for p in params:
            counts.update(flip=p.flip, jitter=p.jitter is not None, gray=p.gray, blur=p.blur is not None,
                          solarize=bool(p.solarize))
            if p.jitter is not None:
                jitters.append(p.jitter)
            if p.blur is not None:
                radii.append(p.blur)
        for what, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", blur_p),
                           ("solarize", solarize_p)):
            assert binomial_ok(counts[what], n, prob), (name, what, counts[what], n * prob)
    orders = collections.Counter(tuple(j[0]) for j in jitters)
    assert len(orders) == 24 and all(binomial_ok(c, len(jitters), 1 / 24) for c in orders.values()), orders
    for idx, (lo, hi) in zip(range(1, 5), ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
        v = np.array([j[idx] for j in jitters])
        assert v.min() >= lo and v.max() <= hi
        grid = np.sort(v)
        assert np.abs(np.arange(1, len(v) + 1) / len(v) - (grid - lo) / (hi - lo)).max() < 0.03, idx
    radii = np.sort(radii)
    assert radii.min() >= 0.1 and radii.max() <= 2.0
    assert np.abs(np.arange(1, len(radii) + 1) / len(radii) - (radii - 0.1) / 1.9).max() < 0.03


# ----------------------------------------------------------------------------------------------------
# Pixel operations against PIL's
# ----------------------------------------------------------------------------------------------------
def pil_to_float(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


@pytest.mark.parametrize("make_image", [smooth_image, noise_image], ids=["smooth", "noise"])
def test_pixel_operations_match_pil(make_image):
    """Brightness and solarization give PIL's 8-bit results exactly, contrast, saturation and grayscale up
    to a rare rounding tie of PIL's fixed-point luma (the blends truncate as PIL's); resize, hue and blur
    differ by a few levels at most (fixed-point resampling, PIL's 8-bit HSV, PIL's rounding after each
    box pass)."""
    img = make_image((70, 52), seed=3)
    x = pil_to_float(img)
    scratch = augmentations.Scratch()

    def check(ours, theirs, max_diff, mean_diff, what):
        d = (ours.round() - pil_to_float(theirs)).abs()
        assert d.max() <= max_diff and d.mean() <= mean_diff, (what, d.max(), d.mean())

    for f in (0.6, 0.93, 1.27, 1.4):
        check(augmentations.adjust_brightness(x.clone(), f), TF.adjust_brightness(img, f), 0, 0, ("brightness", f))
        # the mean luma: PIL rounds the luma image first, which can move its rounded mean by one level
        check(augmentations.adjust_contrast(x.clone(), f), TF.adjust_contrast(img, f), 1, 0.5, ("contrast", f))
    for f in (0.8, 1.07, 1.2):
        check(augmentations.adjust_saturation(x.clone(), f, scratch), TF.adjust_saturation(img, f), 1, 0.05,
              ("saturation", f))
    # PIL truncates hue and saturation to 8 bits in its HSV image: its own round trip (a shift of 0) moves
    # saturated pixels by a few levels; ours is exact, so it differs from PIL by about that much
    round_trip = (x - pil_to_float(TF.adjust_hue(img, 0.0))).abs()
    for h in (-0.1, -0.037, 0.05, 0.1):
        check(augmentations.adjust_hue(x.clone(), int(h * 255) / 255, scratch), TF.adjust_hue(img, h),
              round_trip.max() + 4, round_trip.mean() + 0.4, ("hue", h))
    check(augmentations.grayscale(x, scratch).expand(3, -1, -1), TF.rgb_to_grayscale(img, 3), 1, 0.01, "grayscale")
    check(augmentations.solarize(x.clone()), ImageOps.solarize(img), 0, 0, "solarize")
    # PIL rounds after each of its six passes: at the smallest radii, where a pass moves a pixel by less
    # than half a level, that rounding undoes the blur (ours moves noise pixels by about one level)
    for sigma in (0.1, 0.5, 1.0, 1.4, 1.5, 2.0):
        check(augmentations.gaussian_blur(x, sigma, scratch), img.filter(ImageFilter.GaussianBlur(sigma)), 3, 1.2,
              ("blur", sigma))
    src = augmentations.image_to_uint8(img)
    for (i, j, h, w), size in (((3, 5, 40, 50), 32), ((0, 0, 52, 70), 96), ((10, 20, 11, 13), 24)):
        ours = augmentations.resized_crop(src, i, j, h, w, size).float()
        theirs = TF.resized_crop(img, i, j, h, w, [size, size], transforms.InterpolationMode.BICUBIC)
        check(ours, theirs, 2, 0.1, ("resize", size))


def test_batched_blur_equals_one_by_one():
    """Crops blurred together (kernels of different widths padded with zeros), or a subset of them in
    place, give the same result as one crop at a time."""
    x = pil_to_float(noise_image((24, 24))).expand(5, 3, 24, 24).clone() + torch.arange(5.).view(5, 1, 1, 1)
    sigmas = [0.3, 1.9, 1.0, 1.42, 0.1]
    single = torch.stack([augmentations.gaussian_blur(x[k], s) for k, s in enumerate(sigmas)])
    torch.testing.assert_close(augmentations.gaussian_blur(x, sigmas), single, atol=1e-3, rtol=0)
    y = x.clone()
    augmentations.gaussian_blur(y, [sigmas[1], sigmas[3]], index=[1, 3])
    torch.testing.assert_close(y[[1, 3]], single[[1, 3]], atol=1e-3, rtol=0)
    assert torch.equal(y[[0, 2, 4]], x[[0, 2, 4]])


# ----------------------------------------------------------------------------------------------------
# Shapes, dtypes, normalisation, determinism
# ----------------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_constant_image_normalisation():
    """2 x 224 + 8 x 96 float32 contiguous crops; a constant image with no colour operation gives the
    ImageNet-normalised constants exactly; with every operation, each crop of a constant image is constant
    per channel, on the 8-bit grid, and the official one within a few levels (hue rounding)."""
    colour = (200, 120, 40)
    img = Image.new("RGB", (150, 110), colour)
    aug = augmentations.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 8)
    off = official.DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 8)
    for seed in range(3):
        with data.seeded_rng(seed):
            crops = aug(img)
        with data.seeded_rng(seed):
            ref = off(img)
        assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
        for c, r in zip(crops, ref):
            assert c.dtype == torch.float32 and c.is_contiguous() and not c.requires_grad and not c.is_inference()
            raw = (c * STD + MEAN) * 255
            assert (raw - raw.round()).abs().max() < 2e-3  # 8-bit grid
            assert (raw - raw[:, :1, :1]).abs().max() < 2e-3  # constant per channel
            assert ((c - r) * STD * 255).abs().max() <= 4
    plain = augmentations.CropParams((0, 0, 110, 150), False, None, False, None, False)
    expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    for size in (224, 96, 17):
        out = augmentations.render_crops(augmentations.image_to_uint8(img), size, [plain])[0]
        torch.testing.assert_close(out, expected.expand(3, size, size), atol=1e-6, rtol=0)
    # one channel (grayscale) is broadcast to three equal ones
    gray = augmentations.CropParams((0, 0, 110, 150), False, None, True, None, False)
    out = augmentations.render_crops(augmentations.image_to_uint8(img), 8, [gray])[0]
    luma = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
    torch.testing.assert_close(out * STD + MEAN, torch.full((3, 8, 8), luma / 255), atol=1e-6, rtol=0)


def test_same_seed_same_crops_and_no_shared_buffers():
    """Same seed: identical crops; another seed: other crops; crops returned earlier are not changed by
    later calls (the temporary buffers are reused, the outputs are not); the global RNGs are untouched."""
    aug, _ = augs(n_local=3, global_size=40, local_size=24)
    a_img, b_img = smooth_image((90, 70), seed=1), noise_image((60, 80), seed=2)
    torch.manual_seed(5)
    random.seed(5)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    with data.seeded_rng(data.sample_seed(7, 2, 11)):
        first = aug(a_img)
    kept = [c.clone() for c in first]
    with data.seeded_rng(data.sample_seed(7, 2, 12)):
        other = aug(a_img)
    with data.seeded_rng(data.sample_seed(7, 2, 11)):
        aug(b_img)
    with data.seeded_rng(data.sample_seed(7, 2, 11)):
        again = aug(a_img)
    assert all(torch.equal(x, y) for x, y in zip(first, kept))  # not overwritten by the later calls
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not any(torch.equal(x, y) for x, y in zip(first, other))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    # a single crop transform, called alone, draws and renders the same way
    with data.seeded_rng(3):
        one = aug.global_transfo1(a_img)
    with data.seeded_rng(3):
        params = aug.global_transfo1.sample(70, 90)
    assert torch.equal(one, augmentations.render_crops(augmentations.image_to_uint8(a_img), 40, [params])[0])


# ----------------------------------------------------------------------------------------------------
# DataAugmentationDINO: shapes, normalisation, application of the pixel operations
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_local,gsize,lsize", [(3, 64, 32), (0, 48, 16), (1, 32, 24)])
def test_augmentation_shapes_and_normalisation(n_local, gsize, lsize):
    random.seed(0)
    torch.manual_seed(0)
    crops = small_aug(n_local, gsize, lsize)(noise_image((50, 37)))
    assert isinstance(crops, list) and len(crops) == 2 + n_local
    for i, c in enumerate(crops):
        size = gsize if i < 2 else lsize
        assert isinstance(c, torch.Tensor) and c.dtype == torch.float32
        assert tuple(c.shape) == (3, size, size), (i, c.shape)
        # ImageNet-normalised: un-normalising gives values in [0, 1] ...
        raw = c * STD + MEAN
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        # ... onto the 8-bit grid: every transform works on PIL images, so ToTensor gives k/255 exactly;
        # this holds only with exactly the ImageNet mean and std.
        k = raw * 255
        assert (k - k.round()).abs().max() < 2e-3
        assert not torch.allclose(c, raw)  # normalisation did happen


def test_augmentation_of_constant_image_is_imagenet_normalised():
    """A mid-grey image stays near-constant through crops and blur; check the normalisation constants."""
    img = Image.new("RGB", (40, 40), (128, 128, 128))
    aug = small_aug(1, 32, 16)
    random.seed(1)
    torch.manual_seed(1)
    for _ in range(5):
        for c in aug(img):
            raw = c * STD + MEAN
            # whatever the jitter/solarization did, channels are equal (grey stays grey) and un-normalise to [0, 1]
            assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
            assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_augmentation_probabilities(monkeypatch):
    """Over 300 calls: blur always on g1, ~10% on g2, ~50% on locals; solarization only on g2 (~20%);
    grayscale ~20% on every crop. The drawn parameters (recorded per crop transform) have these
    frequencies, and the pixel operations run exactly as often as drawn (counted per crop size)."""
    n_calls, n_local = 300, 2
    aug = small_aug(n_local, 32, 16)
    drawn = collections.defaultdict(list)
    for label in ("global_transfo1", "global_transfo2", "local_transfo"):
        transform = getattr(aug, label)

        def record(height, width, sample=transform.sample, label=label):
            drawn[label].append(sample(height, width))
            return drawn[label][-1]
        monkeypatch.setattr(transform, "sample", record)

    solarized, blurred, radii = collections.Counter(), collections.Counter(), []
    real_solarize, real_blur = augmentations.solarize, augmentations.gaussian_blur

    def spy_solarize(x, *a, **k):
        solarized[x.shape[-1]] += 1
        return real_solarize(x, *a, **k)

    def spy_blur(x, sigma, *a, **k):
        sigmas = [sigma] if isinstance(sigma, float) else list(sigma)
        blurred[x.shape[-1]] += len(sigmas)
        radii.extend(sigmas)
        return real_blur(x, sigma, *a, **k)

    monkeypatch.setattr(augmentations, "solarize", spy_solarize)
    monkeypatch.setattr(augmentations, "gaussian_blur", spy_blur)

    img = noise_image((40, 40))
    random.seed(123)
    torch.manual_seed(123)
    gray = collections.Counter()
    for _ in range(n_calls):
        crops = aug(img)
        for i, c in enumerate(crops):
            raw = c * STD + MEAN
            if torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5):
                gray["global_transfo1" if i == 0 else "global_transfo2" if i == 1 else "local_transfo"] += 1

    count = {label: collections.Counter() for label in drawn}
    for label, params in drawn.items():
        for p in params:
            count[label].update(blur=p.blur is not None, solarize=bool(p.solarize), gray=bool(p.gray))
    g1, g2, local = count["global_transfo1"], count["global_transfo2"], count["local_transfo"]
    assert len(drawn["global_transfo1"]) == len(drawn["global_transfo2"]) == n_calls
    assert len(drawn["local_transfo"]) == n_local * n_calls
    assert g1["solarize"] == 0 and local["solarize"] == 0, count
    assert 30 <= g2["solarize"] <= 95, count  # Binomial(300, 0.2): mean 60, sd 6.9
    assert g1["blur"] == n_calls, count
    assert 10 <= g2["blur"] <= 55, count  # Binomial(300, 0.1): mean 30, sd 5.2
    assert 240 <= local["blur"] <= 360, count  # Binomial(600, 0.5): mean 300, sd 12
    # the pixel operations ran as drawn (32 px: the global crops, 16 px: the local ones)
    assert solarized == {32: g2["solarize"]}, (solarized, count)
    assert blurred == {32: g1["blur"] + g2["blur"], 16: local["blur"]}, (blurred, count)
    assert min(radii) >= 0.1 and max(radii) <= 2.0
    for label, n in (("global_transfo1", n_calls), ("global_transfo2", n_calls), ("local_transfo", n_local * n_calls)):
        assert 0.1 * n <= count[label]["gray"] <= 0.32 * n, (label, count)  # RandomGrayscale(p=0.2)
        # grayscale crops have equal channels (a colour crop of a noise image practically never does)
        assert gray[label] == count[label]["gray"], (label, gray, count)
