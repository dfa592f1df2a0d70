# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# DataAugmentationDINO follows facebookresearch/dino (Apache 2.0).
"""The DINO multi-crop augmentation, computed on tensors. Imports only torch, numpy and the standard
library: it can be copied alone into other code.

- `DataAugmentationDINO`: the DINO recipe, returning [g1, g2, l1, ..., lN]: the official random parameters,
  the crops computed on tensors (`render_crops`).
- `CropAugmentation`: one crop of the recipe; `CropAugmentation.sample` draws its random parameters
  (`CropParams`) with the same calls, in the same order, as the official torchvision/PIL transforms.
- `render_crops`: the crops of a list of `CropParams` from one uint8 image.
- The pixel operations (`resized_crop`, `adjust_*`, `grayscale`, `gaussian_blur`, `solarize`, `normalize`),
  each the PIL operation of the official pipeline on 8-bit values.

Randomness: torch's default generator and Python's `random`, as the official pipeline; seed both per sample
(`data.seeded_rng`) for reproducible crops.
"""
import math
import random
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# The pixel operations of DataAugmentationDINO work on float32 tensors [C, H, W] holding 8-bit values in
# [0, 255] (C = 3, or 1 after grayscale). Each is the PIL operation of the official pipeline on its 8-bit
# images, with the same clipping and rounding (the blends truncate, as PIL's `Image.blend`), except that the
# blur keeps fractions (PIL rounds after each of its six box passes) and the hue rotation is exact (PIL's
# 8-bit HSV loses up to a few levels); `normalize` rounds to 8 bits at the end.
#
# They work in place, or in the temporary tensors of a `Scratch` (reused from one crop to the next), and may
# return one of those: only `normalize` returns a new tensor. Allocating a new tensor for every operation
# instead costs page faults on every image (glibc hands the freed memory back to the system and takes it
# again).
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


class Scratch:
    """Temporary tensors by (name, shape, dtype), allocated once."""

    def __init__(self):
        self.buffers: Dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, tuple(shape), dtype)
        buf = self.buffers.get(key)
        if buf is None:
            if len(self.buffers) >= 256:  # many crop sizes: start again rather than grow
                self.buffers.clear()
            buf = self.buffers[key] = torch.empty(key[1], dtype=dtype)
        return buf


_thread_scratch = threading.local()


def thread_scratch() -> Scratch:
    """This thread's `Scratch`, kept from one image to the next (`render_crops` uses it, in inference mode):
    new buffers for each image cost about as many page faults as new tensors for each operation, as soon
    as glibc hands the freed memory back to the system."""
    scratch = getattr(_thread_scratch, "scratch", None)
    if scratch is None:
        scratch = _thread_scratch.scratch = Scratch()
    return scratch


def image_to_uint8(image) -> torch.Tensor:
    """An image as a uint8 tensor [3, H, W] (a view of a height x width x 3 array); tensors pass through."""
    if isinstance(image, torch.Tensor):
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def resized_crop(src: torch.Tensor, i: int, j: int, h: int, w: int, size: int) -> torch.Tensor:
    """`src[:, i:i+h, j:j+w]` (uint8) resized to size x size: bicubic with antialiasing, uint8 out.

    torch's antialiased bicubic is PIL's filter (a = -0.5, support scaled with the downsampling factor),
    so this is `F.resized_crop(pil_image, ..., BICUBIC)` up to the rounding of the fixed-point arithmetic."""
    return torch.nn.functional.interpolate(src[None, :, i:i + h, j:j + w], size=(size, size), mode="bicubic",
                                           align_corners=False, antialias=True)[0]


def _luma(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The 8-bit luma [H, W] of x, as PIL's convert("L")."""
    return torch.mul(x[0], _LUMA[0], out=out).add_(x[1], alpha=_LUMA[1]).add_(x[2], alpha=_LUMA[2]).round_()


def adjust_brightness(x: torch.Tensor, factor: float, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """PIL: blend with black."""
    return x.mul_(factor).floor_().clamp_(0, 255)


def adjust_contrast(x: torch.Tensor, factor: float, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """PIL: blend with the mean luma rounded to 8 bits."""
    mean = math.floor(sum(w * m for w, m in zip(_LUMA, x.mean((1, 2)).tolist())) + 0.5)
    return x.mul_(factor).add_((1 - factor) * mean).floor_().clamp_(0, 255)


def adjust_saturation(x: torch.Tensor, factor: float, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """PIL: blend with the 8-bit luma image."""
    gray = _luma(x, (scratch or Scratch())("luma", x.shape[1:]))
    return x.mul_(factor).add_(gray, alpha=1 - factor).floor_().clamp_(0, 255)


def adjust_hue(x: torch.Tensor, shift: float, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value (max and min of the channels).

    HSV to RGB as f(n) = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1 for R, G, B,
    where V S = max - min; 6 H = 2 i + (next - previous channel) / (max - min), i the first channel holding
    the max (colorsys, PIL's HSV). Elementwise operations and a gather (torch's max over channels with
    indices is slow on CPU)."""
    tmp = scratch or Scratch()
    hw, chw = x.shape[1:], x.shape
    r, g, b = x[0], x[1], x[2]
    top = torch.maximum(torch.maximum(r, g, out=tmp("hue_top", hw)), b, out=tmp("hue_top", hw))
    low = torch.minimum(torch.minimum(r, g, out=tmp("hue_c", hw)), b, out=tmp("hue_c", hw))
    chroma = torch.sub(top, low, out=low)
    is_r = torch.eq(r, top, out=tmp("hue_is_r", hw, torch.bool))
    not_rg = torch.eq(g, top, out=tmp("hue_not_rg", hw, torch.bool)).logical_or_(is_r).logical_not_()
    sector = tmp("hue_sector", (1,) + tuple(hw), torch.int64)  # 0, 1, 2: R, G or B holds the max
    sector[0].copy_(is_r.logical_not_()).add_(not_rg)
    diff = tmp("hue_diff", chw)  # G - B, B - R, R - G
    torch.sub(g, b, out=diff[0])
    torch.sub(b, r, out=diff[1])
    torch.sub(r, g, out=diff[2])
    h6 = torch.gather(diff, 0, sector, out=tmp("hue_h6", (1,) + tuple(hw)))[0]
    h6.div_(torch.clamp(chroma, min=1e-6, out=tmp("hue_div", hw))).add_(sector[0], alpha=2).add_(6 * shift)
    k = torch.add(h6, _HUE_OFFSETS, out=tmp("hue_k", chw))
    t = torch.mul(k, 1 / 6, out=tmp("hue_t", chw)).floor_().mul_(6)
    k.sub_(t)  # mod 6
    torch.minimum(k, torch.neg(k, out=t).add_(4), out=k)
    return k.clamp_(0, 1).mul_(chroma).neg_().add_(top).round_()


def grayscale(x: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """The 8-bit luma, one channel [1, H, W] (normalize broadcasts it to three, as convert("L").convert("RGB"))."""
    return _luma(x, (scratch or Scratch())("gray", x.shape[1:]))[None]


def pil_box_radius(sigma: float, passes: int = 3) -> float:
    """The box radius of Pillow's Gaussian blur: `passes` extended box blurs of variance sigma^2 / passes
    (Gwosdek et al. 2011; Pillow's `_gaussian_blur_radius`), a fractional radius l + a."""
    sigma2 = sigma * sigma / passes
    length = math.sqrt(12.0 * sigma2 + 1.0)
    l = math.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return l + a


def gaussian_blur(x: torch.Tensor, sigma, scratch: Optional[Scratch] = None,
                  index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """PIL's `ImageFilter.GaussianBlur(radius=sigma)`: in each direction, three extended box blurs of radius
    l + a (weight w on the 2l + 1 central pixels, a w on the next two), each with the edge pixels extended
    (Pillow's `ImagingHorizontalBoxBlur`): the same linear filter (PIL rounds to 8 bits after each pass).

    x: [C, H, W] and one sigma, or [N, C, H, W] and N sigmas (one per image, all blurred together: the
    kernels are padded with zeros to the widest one); with `index`, only the images x[index] are blurred,
    with one sigma each, and written back into x, which is returned. Each pass reads a padded buffer and
    writes the interior of another, whose edges are then filled."""
    tmp = scratch or Scratch()
    images = list(x if x.dim() == 4 else x[None]) if index is None else [x[k] for k in index]
    sigmas = [float(sigma)] if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != len(images):
        raise ValueError(f"gaussian_blur: {len(sigmas)} sigmas for {len(images)} images")
    taps = []  # per image: the weights of offsets 0, 1, ..., l + 1
    for s in sigmas:
        radius = pil_box_radius(s)
        l = int(radius)
        w = 1.0 / (2 * radius + 1)
        taps.append([w] * (l + 1) + [(1.0 - (2 * l + 1) * w) / 2])
    p = max(len(t) for t in taps) - 1  # padding: the widest kernel's reach
    taps = [t + [0.0] * (p + 1 - len(t)) for t in taps]
    if len(taps) == 1:
        weights = taps[0]
    else:  # [N, 1, 1, 1] per offset
        weights = list(torch.tensor(taps, dtype=torch.float32).t().reshape(p + 1, -1, 1, 1, 1))
    batch = x if x.dim() == 4 and index is None else None
    for dim in (3, 2):  # rows, then columns
        shape = [len(images)] + list(images[0].shape)
        n = shape[dim]
        pair = tmp(f"blur{dim}pair", shape)
        shape[dim] += 2 * p
        bufs = [tmp(f"blur{dim}{k}", shape) for k in range(2)]
        if batch is not None:
            bufs[0].narrow(dim, p, n).copy_(batch)
        else:  # the images one by one, straight into the padded buffer
            for interior, image in zip(bufs[0].narrow(dim, p, n), images):
                interior.copy_(image)
        for i in range(3):
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            src.narrow(dim, 0, p).copy_(src.narrow(dim, p, 1).expand_as(src.narrow(dim, 0, p)))
            src.narrow(dim, p + n, p).copy_(src.narrow(dim, p + n - 1, 1).expand_as(src.narrow(dim, 0, p)))
            batch = dst.narrow(dim, p, n)
            torch.add(src.narrow(dim, p - 1, n), src.narrow(dim, p + 1, n), out=batch).mul_(weights[1])
            if isinstance(weights[0], float):
                batch.add_(src.narrow(dim, p, n), alpha=weights[0])
            else:
                batch.addcmul_(src.narrow(dim, p, n), weights[0])
            for d in range(2, p + 1):
                if isinstance(weights[d], float):
                    batch.add_(src.narrow(dim, p - d, n), alpha=weights[d])
                    batch.add_(src.narrow(dim, p + d, n), alpha=weights[d])
                else:
                    batch.addcmul_(torch.add(src.narrow(dim, p - d, n), src.narrow(dim, p + d, n), out=pair),
                                   weights[d])
    if index is not None:
        for k, image in zip(index, batch):
            x[k].copy_(image)
        return x
    return batch if x.dim() == 4 else batch[0]


def solarize(x: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """PIL's `ImageOps.solarize` (threshold 128: v >= 128 -> 255 - v) on the values `normalize` rounds to
    8 bits: min(x, 255 - x) rounds to 255 - v for v >= 128 and to v for v <= 127."""
    return torch.minimum(x, torch.neg(x, out=(scratch or Scratch())("solarize", x.shape)).add_(255), out=x)


_NORM_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_DEFAULT_STD))).view(3, 1, 1)
_NORM_SHIFT = (-torch.tensor(IMAGENET_DEFAULT_MEAN) / torch.tensor(IMAGENET_DEFAULT_STD)).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ToTensor + ImageNet Normalize fused, (v / 255 - mean) / std, for x [..., C, H, W] already rounded to
    8 bits: a new contiguous tensor with 3 channels (one channel gives three equal ones)."""
    return x.mul(_NORM_SCALE).add_(_NORM_SHIFT)  # cheaper than the broadcasting addcmul


def unnormalize(img: torch.Tensor) -> np.ndarray:
    """The inverse of the ImageNet normalisation for display: [1, 3, H, W] (or [3, H, W]) -> [H, W, 3] uint8,
    the colours the model was shown, rounded to the nearest 8-bit level as torchvision.utils.save_image does."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    x = (img.reshape(3, *img.shape[-2:]).detach().cpu().float() * std + mean).clamp(0, 1)
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


class CropParams:
    """The random parameters of one crop, drawn by `CropAugmentation.sample`."""
    __slots__ = ("box", "flip", "jitter", "gray", "blur", "solarize")

    def __init__(self, box, flip, jitter, gray, blur, solarize):
        self.box = box  # (i, j, h, w): top, left, height, width in the source image
        self.flip = flip  # horizontal flip
        self.jitter = jitter  # None, or (order, brightness, contrast, saturation, hue) of ColorJitter.get_params
        self.gray = gray  # grayscale
        self.blur = blur  # None, or the blur radius (sigma)
        self.solarize = solarize

    def __repr__(self) -> str:
        return "CropParams(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


# The ranges of ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), computed as torchvision's
# `ColorJitter._check_input` does (without importing torchvision): [1 - v, 1 + v] clipped at 0, hue [-v, v].
_JITTER_RANGES = tuple((max(1 - float(v), 0.0), 1 + float(v)) for v in (0.4, 0.4, 0.2)) + ((0 - 0.1, 0 + 0.1),)


class CropAugmentation:
    """One crop of the DINO recipe, from an image to a normalised float tensor [3, size, size]:
    RandomResizedCrop(size, scale, bicubic), RandomHorizontalFlip(0.5), RandomApply(ColorJitter(0.4, 0.4,
    0.2, 0.1), 0.8), RandomGrayscale(0.2), GaussianBlur(blur_p, radius in [0.1, 2]), Solarization(solarize_p)
    when solarize_p > 0, ToTensor + Normalize(ImageNet).

    `sample(height, width)` draws the parameters exactly as the official torchvision/PIL transforms do: the
    same calls, in the same order, on torch's generator (crop, flip, jitter, grayscale) and Python's `random`
    (blur, solarization), so that under the same seed the parameters are those of the official pipeline.
    `render_crops` then computes the crops on tensors. Calling the transform does both, for one crop of
    an image (PIL, or a uint8 tensor [3, H, W])."""

    def __init__(self, size: int, scale: Sequence[float], blur_p: float, solarize_p: float = 0.0,
                 ratio: Sequence[float] = (3. / 4., 4. / 3.)):
        self.size = int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.jitter_ranges = _JITTER_RANGES
        self.log_ratio = tuple(float(v) for v in torch.log(torch.tensor(self.ratio)))
        self.flip_p, self.jitter_p, self.gray_p = 0.5, 0.8, 0.2
        self.flip_p32, self.jitter_p32, self.gray_p32 = (float(np.float32(p)) for p in (0.5, 0.8, 0.2))
        self.blur_p, self.blur_radius = blur_p, (0.1, 2.0)
        self.solarize_p = solarize_p

    def __repr__(self) -> str:
        return (f"CropAugmentation(size={self.size}, scale={self.scale}, blur_p={self.blur_p}, "
                f"solarize_p={self.solarize_p})")

    def sample(self, height: int, width: int) -> CropParams:
        # RandomResizedCrop.get_params, the same torch calls
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(*self.log_ratio)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                box = (i, j, h, w)
                break
        else:  # the same fallback: a central crop
            in_ratio = width / height
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        # torch.rand(1) < p compares in float32: p32 is p rounded to float32
        flip = torch.rand(1).item() < self.flip_p32
        jitter = None
        if not self.jitter_p32 < torch.rand(1).item():  # RandomApply
            order = torch.randperm(4).tolist()  # ColorJitter.get_params, the same torch calls
            b, c, s, h = (torch.empty(1).uniform_(lo, hi).item() for lo, hi in self.jitter_ranges)
            jitter = (order, b, c, s, h)
        gray = torch.rand(1).item() < self.gray_p32
        blur = random.uniform(*self.blur_radius) if random.random() <= self.blur_p else None
        solarize = self.solarize_p > 0 and random.random() < self.solarize_p
        return CropParams(box, flip, jitter, gray, blur, solarize)

    def __call__(self, image) -> torch.Tensor:
        src = image_to_uint8(image)
        return render_crops(src, self.size, [self.sample(src.shape[-2], src.shape[-1])])[0]


def render_crops(src: torch.Tensor, size: int, params: Sequence["CropParams"],
                 scratch: Optional[Scratch] = None) -> List[torch.Tensor]:
    """The crops of `params` (CropParams, see `CropAugmentation`) from the uint8 image `src` [3, H, W], all
    size x size, each as the official transforms would: crop and resize (uint8, bicubic with antialiasing),
    flip, colour jitter in its order, grayscale, blur, solarization, to-tensor + normalisation. Returns new
    normalised float tensors [3, size, size] (views of one [N, 3, size, size] tensor).

    The crops go through resize and colour one by one, then blur (those that have it) and normalisation
    together, one tensor operation for all of them. Inside inference mode (no autograd bookkeeping; the outputs
    are made outside it), on one intra-op thread (restored after; DataLoader workers have one already): on
    tensors this small, more threads cost more in synchronisation than they save."""
    tmp = scratch or thread_scratch()
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():  # no autograd bookkeeping: less overhead per operation
            batch = tmp("crops", (len(params), 3, size, size))
            for x, p in zip(batch, params):
                crop = resized_crop(src, *p.box, size)
                x.copy_(crop.flip(-1) if p.flip else crop)
                if p.jitter is not None:
                    order, b, c, s, h = p.jitter
                    for fn in order:
                        if fn == 0:
                            adjust_brightness(x, b, tmp)
                        elif fn == 1:
                            adjust_contrast(x, c, tmp)
                        elif fn == 2:
                            adjust_saturation(x, s, tmp)
                        elif int(h * 255):  # PIL shifts its 8-bit hue (255 per turn) by int(255 h)
                            x.copy_(adjust_hue(x, int(h * 255) / 255, tmp))
                if p.gray:
                    x.copy_(grayscale(x, tmp).expand_as(x))
            blurred = [k for k, p in enumerate(params) if p.blur is not None]
            if len(blurred) == len(params):
                batch = gaussian_blur(batch, [p.blur for p in params], tmp)
            elif blurred:
                batch = gaussian_blur(batch, [params[k].blur for k in blurred], tmp, index=blurred)
            for x, p in zip(batch, params):
                if p.solarize:
                    solarize(x, tmp)
            batch.round_()  # to 8 bits, as the official pipeline's images
        return list(normalize(batch).unbind(0))  # outside inference mode: normal tensors
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class DataAugmentationDINO:
    """Two global crops and `local_crops_number` local crops, as in the DINO paper: the official recipe
    (first global crop always blurred, second blurred with p 0.1 and solarized with p 0.2, local crops
    blurred with p 0.5), with the same random parameters under the same seed (see `CropAugmentation`),
    computed on tensors (`render_crops`), faster than the official PIL pipeline (BENCHMARKS.md,
    `benchmarks/bench_data.py`). The crops differ from the official ones by
    rounding only: the official pipeline rounds to 8 bits after every operation, its hue goes through 8-bit
    HSV, its resampling is PIL's (see the pixel operations above; `tests/test_augmentation_stats.py`).

    `gram_crops_size` (DINOv3's `gram_teacher_crops_size`): two more crops at the end, the two global crops again
    at this size, from the same box of the image with the same flip, colours and solarization, the blur radius
    scaled with the size, so that they are the global crops at a higher resolution (DINOv3 draws them at the
    larger size and resizes down for the student); the other crops and their random draws are unchanged."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 gram_crops_size: Optional[int] = None):
        self.global_transfo1 = CropAugmentation(global_crops_size, global_crops_scale, blur_p=1.0)
        self.global_transfo2 = CropAugmentation(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2)
        self.local_crops_number = local_crops_number
        self.local_transfo = CropAugmentation(local_crops_size, local_crops_scale, blur_p=0.5)
        self.gram_crops_size = gram_crops_size

    def __call__(self, image) -> List[torch.Tensor]:
        src = image_to_uint8(image)  # converted once, shared by all crops
        height, width = src.shape[-2:]
        # all the random parameters first, in the official order: first global crop, second, local crops
        global_params = [self.global_transfo1.sample(height, width), self.global_transfo2.sample(height, width)]
        local_params = [self.local_transfo.sample(height, width) for _ in range(self.local_crops_number)]
        crops = render_crops(src, self.global_transfo1.size, global_params)
        if local_params:
            crops += render_crops(src, self.local_transfo.size, local_params)
        if self.gram_crops_size:
            scale = self.gram_crops_size / self.global_transfo1.size
            larger = [CropParams(p.box, p.flip, p.jitter, p.gray, None if p.blur is None else p.blur * scale,
                                 p.solarize) for p in global_params]
            crops += render_crops(src, self.gram_crops_size, larger)
        return crops
