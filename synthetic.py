# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# DataAugmentationDINO follows facebookresearch/dino (Apache 2.0).
"""Data for self-supervised pretraining: multi-crop augmentation, datasets, sampling and loading.

- `DataAugmentationDINO`: the DINO recipe, returning [g1, g2, l1, ..., lN]: the official random parameters,
  the crops computed on tensors (`render_crops`).
- `MaskingGenerator`, `BlockMaskSampler`, `MaskedCrops`: iBOT block masks for the global crops (exact
  mask ratios, drawn per crop under the per-sample seed); `MaskedCrops(transform, sampler)` returns
  `(crops, masks)`.
- `build_dataset(data_path)`: an ImageFolder tree, several roots merged (e.g. ImageNet-100's
  `train.X1,...,train.X4`), or `synthetic`: a generated shapes dataset cached on disk.
- `PretrainDataset` + `EpochSampler`: every sample's augmentation is seeded from (seed, epoch, index),
  so a run is reproducible whatever the number of workers or ranks, and a resumed run sees exactly the
  augmentations of an uninterrupted one. Unreadable images are replaced by another sample and reported.
- `build_loader(...)`: the DataLoader with all of that wired in.
- `eval_transform`, `EvalDataset`, `build_eval_loader`: the deterministic side, for k-NN and linear
  evaluation (dataset order kept, unreadable images flagged rather than replaced).
"""
import contextlib
import glob
import itertools
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import UserError, print_all_ranks

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------
# The pixel operations of DataAugmentationDINO work on float32 tensors [C, H, W] holding 8-bit values in
# [0, 255] (C = 3, or 1 after grayscale). Each is the PIL operation of the official pipeline on its 8-bit
# images, with the same clipping and rounding (the blends truncate, as PIL's `Image.blend`), except that the
# blur keeps fractions (PIL rounds after each of its six box passes) and the hue rotation is exact (PIL's
# 8-bit HSV loses up to a few levels); `normalize` rounds to 8 bits at the end.
#
# They work in place, or in the temporary tensors of a `Scratch` (reused from one crop to the next), and may
# return one of those: only `normalize` returns a new tensor. Allocating a new tensor for every operation
# instead costs about 1000 page faults per image at 224 px (glibc hands the freed memory back to the system
# and takes it again), about 20% of the time.
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
    return x.mul(_NORM_SCALE).add_(_NORM_SHIFT)  # 2.5x faster than the broadcasting addcmul


class CropParams:
    """The random parameters of one crop, drawn by `MultiCropTransform.sample`."""
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


class MultiCropTransform:
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
        from torchvision import transforms
        self.size = int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        self.jitter_ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        self.log_ratio = tuple(float(v) for v in torch.log(torch.tensor(self.ratio)))
        self.flip_p, self.jitter_p, self.gray_p = 0.5, 0.8, 0.2
        self.flip_p32, self.jitter_p32, self.gray_p32 = (float(np.float32(p)) for p in (0.5, 0.8, 0.2))
        self.blur_p, self.blur_radius = blur_p, (0.1, 2.0)
        self.solarize_p = solarize_p

    def __repr__(self) -> str:
        return (f"MultiCropTransform(size={self.size}, scale={self.scale}, blur_p={self.blur_p}, "
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
    """The crops of `params` (CropParams, see `MultiCropTransform`) from the uint8 image `src` [3, H, W], all
    size x size, each as the official transforms would: crop and resize (uint8, bicubic with antialiasing),
    flip, colour jitter in its order, grayscale, blur, solarization, to-tensor + normalisation. Returns new
    normalised float tensors [3, size, size] (views of one [N, 3, size, size] tensor).

    The crops go through resize and colour one by one, then blur (those that have it) and normalisation
    together, one tensor operation for all of them (with 8 local crops, 5% faster than one by one). Inside
    inference mode (no autograd bookkeeping: 6% faster; the outputs are made outside it), on one intra-op
    thread (restored after; DataLoader workers have one already)."""
    tmp = scratch or thread_scratch()
    threads = torch.get_num_threads()
    if threads > 1:  # small tensors: one thread (2 threads make floor_ take milliseconds, torch 2.14 + OpenMP)
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
    blurred with p 0.5), with the same random parameters under the same seed (see `MultiCropTransform`),
    computed on tensors (`render_crops`): 2.2-2.4x the official PIL pipeline's throughput on one thread,
    decode included (BENCHMARKS.md, `benchmarks/bench_data.py`). The crops differ from the official ones by
    rounding only: the official pipeline rounds to 8 bits after every operation, its hue goes through 8-bit
    HSV, its resampling is PIL's (see the pixel operations above; `tests/test_augmentation_stats.py`)."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96):
        self.global_transfo1 = MultiCropTransform(global_crops_size, global_crops_scale, blur_p=1.0)
        self.global_transfo2 = MultiCropTransform(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2)
        self.local_crops_number = local_crops_number
        self.local_transfo = MultiCropTransform(local_crops_size, local_crops_scale, blur_p=0.5)

    def __call__(self, image) -> List[torch.Tensor]:
        src = image_to_uint8(image)  # converted once, shared by all crops
        height, width = src.shape[-2:]
        # all the random parameters first, in the official order: first global crop, second, local crops
        global_params = [self.global_transfo1.sample(height, width), self.global_transfo2.sample(height, width)]
        local_params = [self.local_transfo.sample(height, width) for _ in range(self.local_crops_number)]
        crops = render_crops(src, self.global_transfo1.size, global_params)
        if local_params:
            crops += render_crops(src, self.local_transfo.size, local_params)
        return crops


# ----------------------------------------------------------------------------------------------------
# iBOT block masking
# ----------------------------------------------------------------------------------------------------
class MaskingGenerator:
    """Block-wise masking of an (h, w) grid, as in BEiT, iBOT and DINOv2 (`dinov2/data/masking.py`).

    `__call__(n)` returns a bool numpy array [h, w] with exactly `n` True cells. Blocks come first, as in
    the reference: a block has a target area uniform in [min_num_patches, min(max_num_patches, cells
    still to mask)] and an aspect ratio h/w log-uniform in [min_aspect, max_aspect] (max_aspect defaults
    to 1 / min_aspect); its sides are the rounded square roots, each strictly smaller than the grid (as
    in the reference), at a uniformly random position. A block is kept only if it masks at least one new
    cell and no more new cells than are still to mask (overlaps allowed; only new cells count); up to 10
    tries per block, blocks until `n` cells are masked or 10 tries in a row fail.

    Difference with DINOv2, whose generator can stop short of `n`: when the blocks stop short, random
    unmasked cells are added until exactly `n` are masked, so the mask ratio is exactly the one asked.
    With DINOv2's sizes this is seldom needed and adds a few cells (when what is left is smaller than
    any block that fits).

    Randomness: Python's `random` module, as the reference (or `rng`, a `random.Random`, when given).
    Under `seeded_rng`, as in `PretrainDataset`, masks are thus a function of (seed, epoch, index) alone,
    whatever the number of workers; numpy's and torch's generators are not used.
    """

    def __init__(self, input_size, num_masking_patches: Optional[int] = None, min_num_patches: float = 4,
                 max_num_patches: Optional[float] = None, min_aspect: float = 0.3,
                 max_aspect: Optional[float] = None):
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size,) * 2
        self.height, self.width = (int(s) for s in input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"MaskingGenerator: input_size must be positive, got {tuple(input_size)}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches  # as the reference: only the default of max_num_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = (num_masking_patches if num_masking_patches is not None else self.num_patches) \
            if max_num_patches is None else max_num_patches
        if not 0 < min_aspect:
            raise ValueError(f"MaskingGenerator: min_aspect must be positive, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
                f"aspect [{math.exp(self.log_aspect_ratio[0]):.3f}, {math.exp(self.log_aspect_ratio[1]):.3f}])")

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def place_block(self, mask: np.ndarray, max_mask_patches: float, rng=None) -> int:
        """Try (up to 10 times) to mask one more block in `mask`, in place; return the new cells masked."""
        rng = random if rng is None else rng
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def blocks(self, num_masking_patches: int = 0, rng=None) -> np.ndarray:
        """The reference's mask: blocks only, possibly fewer than `num_masking_patches` cells."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self.place_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask

    def __call__(self, num_masking_patches: int = 0, rng=None) -> np.ndarray:
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"MaskingGenerator: cannot mask {num_masking_patches} cells of a "
                             f"{self.height}x{self.width} grid")
        rng = random if rng is None else rng
        mask = self.blocks(num_masking_patches, rng)
        missing = num_masking_patches - int(mask.sum())
        if missing > 0:  # top up with random unmasked cells: the count is exact
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[free[rng.sample(range(len(free)), missing)]] = True
        return mask


def parse_mask_ratio(mask_ratio) -> Tuple[float, float]:
    """`--mask_ratio` as a (min, max) pair: one value r means (r, r); two values are (min, max)."""
    values = [mask_ratio] if isinstance(mask_ratio, (int, float)) else list(mask_ratio)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise UserError(f"--mask_ratio {mask_ratio}: give one ratio or two (min max), in [0, 1] with "
                        "min <= max, e.g. --mask_ratio 0.4 or --mask_ratio 0.1 0.5")
    return values[0], values[1]


class BlockMaskSampler:
    """The iBOT mask of one global crop: a bool tensor [N] over the student's patch grid (row-major,
    N = (crop_size // patch_size) ** 2, the order of the ViT's patch tokens).

    With probability `mask_probability` the crop is masked, else its mask is all False. A masked crop
    gets a ratio r ~ Uniform(min, max) of `mask_ratio` (one value r means exactly r), and
    round(r * cells) cells are masked by `MaskingGenerator` (exactly; round half up) on a grid of cells
    of `mask_patch_size` pixels, `crop_size // mask_patch_size` per side, then each cell is expanded to
    its (mask_patch_size // patch_size)^2 patches. mask_patch_size == patch_size (the default) is plain
    per-patch masking as in DINOv2. Block sizes (`min_num_patches`, `max_num_patches`) count cells;
    `max_num_patches` defaults to half the cells, as in DINOv2's training script.

    Difference with DINOv2, whose collate masks exactly int(B * mask_probability) of the B global crops
    of a batch, with ratios spread by a linspace over [min, max] (one sub-interval per masked crop) and
    count int(r * N): here each crop draws on its own (masked or not, then its ratio), seeded per sample,
    so masks do not depend on the batch composition or the number of workers. Over many crops the
    fraction masked and the distribution of ratios are the same; within a batch they vary.

    Randomness: Python's `random` module (or `rng`), so deterministic under `seeded_rng`.
    """

    def __init__(self, crop_size: int, patch_size: int, mask_patch_size: Optional[int] = None,
                 mask_ratio=(0.1, 0.5), mask_probability: float = 0.5, min_num_patches: float = 4,
                 max_num_patches: Optional[float] = None, min_aspect: float = 0.3):
        mask_patch_size = patch_size if mask_patch_size is None else mask_patch_size
        if patch_size <= 0:
            raise UserError(f"--patch_size {patch_size}: must be positive")
        if mask_patch_size <= 0 or mask_patch_size % patch_size:
            raise UserError(f"--mask_patch_size {mask_patch_size} is not a positive multiple of --patch_size "
                            f"{patch_size}: a mask cell must cover whole patches; use e.g. {patch_size} or "
                            f"{2 * patch_size}")
        if crop_size % mask_patch_size:
            fits = [m for m in range(patch_size, crop_size + 1, patch_size) if crop_size % m == 0]
            raise UserError(f"--mask_patch_size {mask_patch_size} does not divide --global_crops_size "
                            f"{crop_size}: the mask cells must tile the crop; use one of {fits}")
        if not 0 <= mask_probability <= 1:
            raise UserError(f"--mask_probability {mask_probability}: must be in [0, 1]")
        self.crop_size, self.patch_size, self.mask_patch_size = crop_size, patch_size, mask_patch_size
        self.mask_ratio = parse_mask_ratio(mask_ratio)
        self.mask_probability = float(mask_probability)
        self.cells_per_side = crop_size // mask_patch_size
        self.num_cells = self.cells_per_side ** 2
        self.cell_scale = mask_patch_size // patch_size
        self.patches_per_side = crop_size // patch_size
        self.num_patches = self.patches_per_side ** 2
        self.generator = MaskingGenerator(
            self.cells_per_side, min_num_patches=min_num_patches,
            max_num_patches=0.5 * self.num_cells if max_num_patches is None else max_num_patches,
            min_aspect=min_aspect)

    def __repr__(self) -> str:
        return (f"BlockMaskSampler(crop {self.crop_size}, patch {self.patch_size}, cells of {self.mask_patch_size} "
                f"px ({self.cells_per_side}x{self.cells_per_side}), ratio {self.mask_ratio}, "
                f"probability {self.mask_probability})")

    def num_masked_cells(self, ratio: float) -> int:
        return int(math.floor(ratio * self.num_cells + 0.5))

    def sample_cells(self, rng=None) -> np.ndarray:
        """The mask on the cell grid: bool [cells_per_side, cells_per_side]."""
        rng = random if rng is None else rng
        if not rng.random() < self.mask_probability:
            return np.zeros((self.cells_per_side,) * 2, dtype=bool)
        ratio = rng.uniform(*self.mask_ratio)
        return self.generator(self.num_masked_cells(ratio), rng)

    def upsample(self, cells: np.ndarray) -> np.ndarray:
        """Cell grid -> patch grid (nearest): each cell becomes a cell_scale x cell_scale block."""
        return cells.repeat(self.cell_scale, axis=0).repeat(self.cell_scale, axis=1)

    def __call__(self, rng=None) -> torch.Tensor:
        return torch.from_numpy(self.upsample(self.sample_cells(rng)).reshape(-1).copy())


class MaskedCrops:
    """Wraps a multi-crop transform (e.g. `DataAugmentationDINO`): `__call__(image) -> (crops, masks)`.

    `crops` is exactly what the transform returns (the masks are drawn after it, so the crops are the
    same as without masking); `masks` is a bool tensor [n_global_crops, N], one independent
    `BlockMaskSampler` mask per global crop (the first `n_global_crops` crops). In `PretrainDataset` the
    default collate gives `(crops, masks)` as a list `[list of ncrops tensors [B, 3, H, W], masks
    [B, n_global_crops, N]]`; `masks.transpose(0, 1).flatten(0, 1)` is [n_global_crops * B, N], in the
    crop-major order of `torch.cat(crops[:n_global_crops])` (MultiCropWrapper's order).
    """

    def __init__(self, transform: Callable, mask_sampler: BlockMaskSampler, n_global_crops: int = 2):
        self.transform = transform
        self.mask_sampler = mask_sampler
        self.n_global_crops = n_global_crops

    def __call__(self, image):
        crops = self.transform(image)
        size = self.mask_sampler.crop_size
        for i, crop in enumerate(crops[:self.n_global_crops]):
            if tuple(crop.shape[-2:]) != (size, size):
                raise ValueError(f"MaskedCrops: global crop {i} is {tuple(crop.shape[-2:])}, the masks are for "
                                 f"{size}x{size} crops")
        masks = torch.stack([self.mask_sampler() for _ in range(self.n_global_crops)])
        return crops, masks

    def __repr__(self) -> str:
        return f"MaskedCrops({self.transform!r}, {self.mask_sampler!r}, n_global_crops={self.n_global_crops})"


# ----------------------------------------------------------------------------------------------------
# Image decoding
# ----------------------------------------------------------------------------------------------------
def pil_loader_rgb(path: str) -> Image.Image:
    """Decode an image file to 8-bit RGB: grayscale, palette, alpha, CMYK and 16-bit images included.

    Raises on anything that is not a complete, decodable image (truncated files included).
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data stored as 16-bit or 32-bit integers: map the full range to 8 bits.
        scale = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite transparent pixels on white rather than on whatever colour they happen to store.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------
def _image_folder_class():
    from torchvision.datasets import ImageFolder

    class MultiRootImageFolder(ImageFolder):
        """ImageFolder over one or several roots; a class is the union of its folders in every root, and
        class indices come from the sorted union of class names (so they agree across the roots)."""

        def __init__(self, roots: Sequence[str], loader: Callable = pil_loader_rgb, transform=None):
            self.roots = list(roots)
            super().__init__(self.roots[0], loader=loader, transform=transform)
            self.root = ",".join(self.roots)

        def find_classes(self, directory):
            names = set()
            for root in self.roots:
                names.update(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
            if not names:
                raise FileNotFoundError(f"no class folders found in {', '.join(self.roots)}")
            classes = sorted(names)
            return classes, {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            from torchvision.datasets.folder import make_dataset
            samples = []
            for root in self.roots:
                present = {c: i for c, i in class_to_idx.items() if os.path.isdir(os.path.join(root, c))}
                try:
                    samples += make_dataset(root, present, extensions, is_valid_file, allow_empty=allow_empty)
                except FileNotFoundError:  # name the folders: with several roots the class alone is ambiguous
                    found = make_dataset(root, present, extensions, is_valid_file, allow_empty=True)
                    nonempty = {target for _, target in found}
                    empty = sorted(c for c, i in present.items() if i not in nonempty)
                    raise FileNotFoundError("no image in the class folder(s) " + ", ".join(
                        os.path.join(root, c) for c in empty)) from None
            return samples

    return MultiRootImageFolder


def resolve_roots(data_path: str) -> List[str]:
    """`--data_path` as a list of ImageFolder roots: one folder, a comma-separated list, or a glob."""
    roots = []
    for part in [p for p in data_path.split(",") if p.strip()]:
        part = os.path.expanduser(part.strip())
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise UserError(f"--data_path pattern {part!r} matches no folder")
        roots += matches
    if not roots:
        raise UserError("--data_path is empty")
    for root in roots:
        if not os.path.isdir(root):
            raise UserError(f"--data_path {root} does not exist or is not a folder: give a folder with one "
                            "sub-folder per class (ImageFolder layout), or 'synthetic' for generated data")
    return roots


def build_dataset(data_path: str, split: str = "train"):
    """An ImageFolder-style dataset (no transform) for `--data_path`.

    `synthetic` (optionally `synthetic:/cache/dir`) generates, or reuses, the shapes dataset and returns
    its `split`; anything else is resolved by `resolve_roots`.
    """
    if data_path == "synthetic" or data_path.startswith("synthetic:"):
        cache = data_path.split(":", 1)[1] if ":" in data_path else None
        root = make_synthetic_dataset(cache) if cache else make_synthetic_dataset()
        roots = [os.path.join(root, split)]
    else:
        roots = resolve_roots(data_path)
    try:
        dataset = _image_folder_class()(roots)
    except FileNotFoundError as e:
        raise UserError(f"--data_path {data_path}: {e}. Each class folder must hold at least one image "
                        "(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)") from None
    return dataset


# ----------------------------------------------------------------------------------------------------
# The default dataset: procedurally generated shapes
# ----------------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = ("bars", "checker", "circle", "crescent", "cross", "hexagon", "ring", "square", "star",
                     "triangle")


def _regular_polygon(cx, cy, r, n, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float,
                fg: Tuple[int, int, int], bg: Tuple[int, int, int]) -> None:
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=bg)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=bg)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r, 4, angle), fill=fg)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, angle), fill=fg)
    elif name == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, angle), fill=fg)
    elif name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            pts.append((cx + rad * math.cos(angle + math.pi * k / 5), cy + rad * math.sin(angle + math.pi * k / 5)))
        draw.polygon(pts, fill=fg)
    elif name == "cross":
        w = 0.3 * r
        for pts in ([(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                    [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]):
            draw.polygon(_rotate(pts, cx, cy, angle), fill=fg)
    elif name == "bars":
        w = 0.22 * r
        for off in (-0.66 * r, 0.0, 0.66 * r):
            pts = [(cx + off - w / 2, cy - r), (cx + off + w / 2, cy - r), (cx + off + w / 2, cy + r),
                   (cx + off - w / 2, cy + r)]
            draw.polygon(_rotate(pts, cx, cy, angle), fill=fg)
    elif name == "checker":
        h = r / 1.5
        for i in range(3):
            for j in range(3):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * h, cy - r + j * h
                    pts = [(x0, y0), (x0 + h, y0), (x0 + h, y0 + h), (x0, y0 + h)]
                    draw.polygon(_rotate(pts, cx, cy, angle), fill=fg)
    else:
        raise ValueError(f"unknown synthetic shape {name}")


def synthetic_image(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `class_index`: a shape of random position, scale, rotation and colour on a
    random gradient background with noise."""
    import colorsys
    ss = 2  # draw at twice the size, then downsample: anti-aliased edges
    big = size * ss

    def colour(lo: float, hi: float):
        h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(lo, hi)
        return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255

    dark_bg = rng.random() < 0.5  # contrast: light shapes on dark backgrounds and vice versa
    c0, c1 = (colour(0.05, 0.45), colour(0.05, 0.45)) if dark_bg else (colour(0.6, 1.0), colour(0.6, 1.0))
    fg = tuple(int(x) for x in (colour(0.7, 1.0) if dark_bg else colour(0.0, 0.35)))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = np.clip((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta) + 0.5, 0, 1)[..., None]
    background = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.42) * big
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8), rng.uniform(r * 0.8, big - r * 0.8)
    bg_at_centre = tuple(int(x) for x in background[int(cy), int(cx)])
    _draw_shape(draw, SYNTHETIC_CLASSES[class_index], cx, cy, r, rng.uniform(0, 2 * math.pi), fg, bg_at_centre)
    img = img.resize((size, size), Image.BICUBIC)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def default_synthetic_root() -> str:
    return os.environ.get("DINO_SYNTHETIC_ROOT", os.path.join(REPO_ROOT, "data_cache"))


def make_synthetic_dataset(cache_dir: Optional[str] = None, num_train_per_class: int = 300,
                           num_val_per_class: int = 60, image_size: int = 64, seed: int = 0) -> str:
    """Write (once) a 10-class shapes dataset as `<cache>/synthetic-.../{train,val}/<class>/*.jpg`.

    Deterministic for a given seed; reused when already complete. Safe when several processes call it
    at once (each writes to a temporary folder and renames it into place). Returns the dataset root.
    """
    cache_dir = cache_dir or default_synthetic_root()
    name = f"synthetic-shapes-s{image_size}-n{num_train_per_class}-{num_val_per_class}-seed{seed}"
    root = os.path.join(cache_dir, name)
    params = {"classes": list(SYNTHETIC_CLASSES), "train_per_class": num_train_per_class,
              "val_per_class": num_val_per_class, "image_size": image_size, "seed": seed, "version": 1}
    marker = os.path.join(root, "dataset.json")
    if os.path.isfile(marker):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
    try:
        for split, per_class, split_seed in (("train", num_train_per_class, 0), ("val", num_val_per_class, 1)):
            for c, cls in enumerate(SYNTHETIC_CLASSES):
                folder = os.path.join(tmp, split, cls)
                os.makedirs(folder)
                rng = np.random.default_rng([seed, split_seed, c])
                for i in range(per_class):
                    synthetic_image(c, rng, image_size).save(os.path.join(folder, f"{cls}_{i:05d}.jpg"), quality=92)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(params, f, indent=1)
        try:
            os.rename(tmp, root)
            print(f"Generated the synthetic shapes dataset in {root}")
        except OSError:  # another process finished first
            if not os.path.isfile(marker):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------
# Seeded, fault-tolerant sampling
# ----------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, independent of workers, ranks and batch order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed Python's and torch's CPU generators for a block, restoring them afterwards (so that data
    loading in the main process does not disturb the training RNG)."""
    py_state = random.getstate()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.default_generator.set_state(torch_state)


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields `(epoch, index)` so that the dataset knows the epoch even in
    persistent workers. Works without a process group (give `num_replicas`/`rank`).

    `set_epoch(epoch, start)` skips the first `start` indices of this rank's share of the epoch without
    reading them: an epoch resumed in its middle sees the rest of the same order (and, with per-sample
    seeding, the same augmentations). `len()` stays the full share, so that schedules do not change."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield (epoch, index)


class PretrainDataset(Dataset):
    """Applies `transform` to the images of an ImageFolder-style `base`, with per-sample seeding.

    An image that cannot be decoded is replaced by another sample (chosen with the same seed, so
    deterministically) and returned in the third field, `"path: error"` lines joined by newlines, for the
    training loop to report and count.
    """

    def __init__(self, base, transform: Callable, seed: int = 0, max_attempts: int = 20):
        self.base = base
        self.samples = base.samples
        self.loader = getattr(base, "loader", pil_loader_rgb)
        self.transform = transform
        self.seed = seed
        self.max_attempts = max_attempts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad = []
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            for _ in range(self.max_attempts):
                path, target = self.samples[index]
                try:
                    image = self.loader(path)
                    break
                except Exception as e:  # any decoding failure: report and replace
                    bad.append(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}")  # one line each
                    index = random.randrange(len(self.samples))
            else:
                raise RuntimeError(f"{self.max_attempts} unreadable images in a row, the last: {bad[-1]}")
            crops = self.transform(image)
        return crops, target, "\n".join(bad)


def eval_transform(resize_size: int = 256, crop_size: int = 224):
    """The official evaluation transform: bicubic resize of the short side, center crop, ImageNet
    normalisation. For small images (CIFAR at 32 px) use e.g. `resize_size=crop_size=32`."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class EvalDataset(Dataset):
    """`(image, label, error)` for the images of an ImageFolder-style `base`, in dataset order.

    An image that cannot be decoded gives a zero image and `error` = "path: reason" (else ""), so that
    evaluation can leave it out and name it instead of stopping or silently changing the dataset.

    With a `seed`, a key `(epoch, index)` (from an EpochSampler) runs the transform under the per-sample seed
    of (seed, epoch, index), as PretrainDataset does: random augmentations (the linear probe's training) are
    then the same whatever the workers and wherever an epoch is resumed. A plain index, or no `seed`: unseeded.
    """

    def __init__(self, base, transform: Callable, seed: Optional[int] = None):
        self.base = base
        self.samples = base.samples
        self.targets = [t for _, t in base.samples]
        self.classes = base.classes
        self.loader = getattr(base, "loader", pil_loader_rgb)
        self.transform = transform
        self.seed = seed
        self._blank = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if self.seed is None or epoch is None:
            return self._item(index)
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            return self._item(index)

    def _item(self, index: int):
        path, target = self.samples[index]
        try:
            return self.transform(self.loader(path)), target, ""
        except Exception as e:
            if self._blank is None:
                self._blank = torch.zeros_like(self.transform(Image.new("RGB", (512, 512))))
            return self._blank, target, f"{path}: {type(e).__name__}: {' '.join(str(e).split())}"


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                      shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                      pin_memory: bool = False, epoch_sampler: bool = False) -> DataLoader:
    """DataLoader for evaluation: each of `world_size` ranks reads its share (DistributedSampler; without
    shuffling, rank r reads indices r, r + world_size, ..., and the last indices are repeated to even the
    shares). Call `loader.sampler.set_epoch(epoch)` when shuffling.

    `epoch_sampler` (training on the images, e.g. the linear probe): an EpochSampler instead, whose `(epoch,
    index)` keys seed a seeded EvalDataset's augmentations per sample and whose `set_epoch(epoch, start)`
    skips the batches an interrupted epoch already consumed, and a generator of the loader's own, so that
    starting an epoch does not consume the global RNG (exact resume)."""
    if epoch_sampler:
        sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        generator = torch.Generator().manual_seed(seed)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        generator = None  # the DataLoader's default
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, worker_init_fn=_seed_worker, generator=generator)


class BadImageTracker:
    """Reports each unreadable image once, counts them, and stops the run above a fraction."""

    def __init__(self, dataset_size: int, max_fraction: float):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.seen: Dict[str, str] = {}

    def update(self, reports: Sequence[str]) -> None:
        for report in reports:
            for line in report.splitlines():
                path, _, error = line.partition(": ")
                if path not in self.seen:
                    self.seen[path] = error
                    print_all_ranks(f"WARNING: skipped unreadable image {path} ({error}); replaced by "
                                    "another sample")
        if len(self.seen) > self.max_fraction * self.dataset_size:
            raise UserError(f"{len(self.seen)} unreadable images out of {self.dataset_size} (more than "
                            f"--max_bad_images_fraction {self.max_fraction}); the first: "
                            f"{next(iter(self.seen))}. Fix or remove them, or raise --max_bad_images_fraction")

    @property
    def count(self) -> int:
        return len(self.seen)


def _ignore_stop_signals() -> None:
    """In a data-loader worker: the signals that ask training to stop (Ctrl-C, SLURM's SIGTERM and USR2, sent
    to every process of the job) are for the main process, which finishes its iteration and checkpoints; a
    worker killed by one would crash it first. A SIGTERM from the main process itself (the DataLoader or
    multiprocessing shutting its workers down) still ends the worker: a waiting thread tells them apart by
    the sender."""
    for signum in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)
    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def _seed_worker(worker_id: int) -> None:
    _ignore_stop_signals()
    # Per-sample seeding makes augmentations independent of this; it seeds any other randomness.
    info = torch.utils.data.get_worker_info()
    base = info.seed % 2**32
    random.seed(base)
    np.random.seed(base)


def _seed_low_priority_worker(worker_id: int) -> None:
    # Training on CPU, workers share the cores with the compute threads: when a worker preempts one of
    # them in the middle of a parallel operation, all the others wait for it. At the lowest priority the
    # workers run in the gaps instead (and at full speed whenever training waits for data).
    os.nice(19)
    _seed_worker(worker_id)


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, drop_last: bool = True,
                 shuffle: bool = True, low_priority_workers: bool = False) -> DataLoader:
    """DataLoader over `dataset` (a PretrainDataset) with an EpochSampler; call
    `loader.sampler.set_epoch(epoch)` before each epoch. `low_priority_workers` (for training on CPU)
    runs the workers at the lowest scheduling priority."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, worker_init_fn=_seed_low_priority_worker if low_priority_workers else _seed_worker,
        # Its own generator: creating iterators must not consume the training RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
    )
