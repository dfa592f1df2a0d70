# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""iBOT block masking of the global crops. Imports only torch, numpy and the standard library: it can be
copied alone into other code.

- `MaskingGenerator`: block-wise masks of a grid with an exact number of masked cells (BEiT, iBOT, DINOv2).
- `BlockMaskSampler`: the mask of one global crop over the student's patch grid (mask probability, ratio
  range, mask cells of several patches).
- `MaskedCrops(transform, sampler)`: a multi-crop transform whose `__call__(image)` returns `(crops, masks)`.
- `collate_masked_crops`: the DataLoader collate of such samples, which adds the flat indices of the masked
  patches (computed in the loader's workers, so that selecting the masked tokens on a GPU needs no host sync).

Invalid settings raise ValueError with the command-line flag in the message (`--mask_ratio`, ...); the
scripts turn it into their one-line error.

Randomness: Python's `random` module only (or a `random.Random` given as `rng`), so masks drawn under a
per-sample seed (`data.seeded_rng`) are a function of (seed, epoch, index) alone.
"""
import math
import random
from typing import Callable, Optional, Tuple

import numpy as np
import torch


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
    Under `data.seeded_rng`, as in `data.PretrainDataset`, masks are thus a function of (seed, epoch, index) alone,
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
        raise ValueError(f"--mask_ratio {mask_ratio}: give one ratio or two (min max), in [0, 1] with "
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

    Randomness: Python's `random` module (or `rng`), so deterministic under `data.seeded_rng`.
    """

    def __init__(self, crop_size: int, patch_size: int, mask_patch_size: Optional[int] = None,
                 mask_ratio=(0.1, 0.5), mask_probability: float = 0.5, min_num_patches: float = 4,
                 max_num_patches: Optional[float] = None, min_aspect: float = 0.3):
        mask_patch_size = patch_size if mask_patch_size is None else mask_patch_size
        if patch_size <= 0:
            raise ValueError(f"--patch_size {patch_size}: must be positive")
        if mask_patch_size <= 0 or mask_patch_size % patch_size:
            raise ValueError(f"--mask_patch_size {mask_patch_size} is not a positive multiple of --patch_size "
                             f"{patch_size}: a mask cell must cover whole patches; use e.g. {patch_size} or "
                             f"{2 * patch_size}")
        if crop_size % mask_patch_size:
            fits = [m for m in range(patch_size, crop_size + 1, patch_size) if crop_size % m == 0]
            raise ValueError(f"--mask_patch_size {mask_patch_size} does not divide --global_crops_size "
                             f"{crop_size}: the mask cells must tile the crop; use one of {fits}")
        if not 0 <= mask_probability <= 1:
            raise ValueError(f"--mask_probability {mask_probability}: must be in [0, 1]")
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


def collate_masked_crops(samples):
    """DataLoader collate of `(((crops, masks), *rest))` samples (MaskedCrops in a dataset): the default collate,
    then `mask_index` appended to the first field, which becomes `[crops, masks [B, G, N], mask_index [M]]`.

    `mask_index` holds the flat indices of the masked patches of `masks.transpose(0, 1).flatten(0, 1)` ([G*B,
    N], crop-major), in the order of boolean indexing: `tokens.flatten(0, 1)[mask_index]` equals
    `tokens[masks_crop_major]` for tokens [G*B, N, D]. Boolean indexing on a GPU must first copy the number of
    selected rows to the host (a synchronisation every step); indices made here, on the CPU, only travel."""
    from torch.utils.data import default_collate
    batch = default_collate(samples)
    crops, masks = batch[0]
    mask_index = masks.transpose(0, 1).reshape(-1).nonzero().squeeze(1)
    return [[crops, masks, mask_index], *batch[1:]]
