"""masking.py, iBOT block masking: MaskingGenerator, BlockMaskSampler, MaskedCrops; seeded loading of masks
(data.py).

CPU only, small images generated in tmp_path; a few seconds.
"""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import augmentations
import data
import masking
import utils


def reference_blocks(height, width, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
    """DINOv2's MaskingGenerator (dinov2/data/masking.py), written out: blocks only, Python's `random`."""
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                num_masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking_patches:
        delta = _mask(min(num_masking_patches - mask_count, max_num_patches))
        if delta == 0:
            break
        mask_count += delta
    return mask


# ----------------------------------------------------------------------------------------------------
# MaskingGenerator
# ----------------------------------------------------------------------------------------------------
def test_generator_blocks_are_dinov2s():
    """Before the top-up, the masks are exactly the reference's for the same Python random state."""
    for (h, w), max_n in [((14, 14), 98), ((7, 7), 24.5), ((5, 9), None)]:
        for trial in range(60):
            n = (trial * 7) % (h * w // 2 + 1)
            gen = masking.MaskingGenerator((h, w), num_masking_patches=n if max_n is None else None,
                                        max_num_patches=max_n)
            random.seed(trial)
            ref = reference_blocks(h, w, n, max_num_patches=max_n)
            random.seed(trial)
            np.testing.assert_array_equal(gen.blocks(n), ref)
            random.seed(trial)
            got = gen(n)
            assert got.sum() == n and (got | ref).sum() == n  # the top-up only adds cells to the blocks


@pytest.mark.parametrize("shape", [(14, 14), (7, 7), (4, 6), (2, 2), (1, 1), (3, 1)])
def test_generator_count_is_exact(shape):
    h, w = shape
    gen = masking.MaskingGenerator(shape, max_num_patches=max(1, 0.5 * h * w))
    rng = random.Random(sum(shape))
    asks = [0, h * w, h * w - 1] + [rng.randint(0, h * w) for _ in range(300)]
    for n in asks:
        mask = gen(max(n, 0), rng)
        assert mask.dtype == np.bool_ and mask.shape == shape
        assert int(mask.sum()) == max(n, 0), (shape, n)
    with pytest.raises(ValueError):
        gen(h * w + 1)
    with pytest.raises(ValueError):
        gen(-1)
    assert masking.MaskingGenerator(5).get_shape() == (5, 5)


def test_generator_mostly_blocks():
    """With DINOv2's setting (14x14, blocks of 4 to 98 patches) the top-up is seldom needed and small:
    the masks are made of blocks, not scattered cells."""
    gen = masking.MaskingGenerator(14, max_num_patches=98)
    rng = random.Random(0)
    short, added, isolated, total = 0, 0, 0, 0
    for _ in range(500):
        n = int(196 * rng.uniform(0.1, 0.5))
        blocks = gen.blocks(n, rng)
        short += blocks.sum() < n
        added += n - blocks.sum()
        mask = gen(n, rng)
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        isolated += int((mask & ~neighbours).sum())
        total += n
    assert short / 500 < 0.2 and added / max(short, 1) < 3
    assert isolated / total < 0.01


def test_block_is_rectangle_with_aspect_in_range():
    """One block on an empty grid: a filled rectangle whose sides are the rounded sqrt(area * aspect),
    sqrt(area / aspect) of an area in [min, max] and an aspect in [min_aspect, 1 / min_aspect]; the
    aspect is log-uniform (tall and wide blocks alike, mean log-aspect ~ 0)."""
    min_area, max_area, min_aspect = 16, 200, 0.3
    gen = masking.MaskingGenerator(40, min_num_patches=min_area, max_num_patches=max_area, min_aspect=min_aspect)
    rng = random.Random(3)
    log_aspects = []
    for _ in range(400):
        mask = np.zeros((40, 40), dtype=bool)
        count = gen.place_block(mask, max_area, rng)
        assert count == mask.sum() > 0
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert h * w == count  # the bounding box is full: a rectangle
        assert count <= max_area
        # some area A in [min, max] and aspect r in [min_aspect, 1/min_aspect] round to (h, w)
        assert (h - 0.5) * (w - 0.5) <= max_area and (h + 0.5) * (w + 0.5) >= min_area
        assert (h - 0.5) / (w + 0.5) <= 1 / min_aspect and (h + 0.5) / (w - 0.5) >= min_aspect
        log_aspects.append(math.log(h / w))
    log_aspects = np.array(log_aspects)
    assert (log_aspects > math.log(2)).mean() > 0.15 and (log_aspects < -math.log(2)).mean() > 0.15
    assert abs(log_aspects.mean()) < 0.12
    assert log_aspects.max() <= math.log(1 / min_aspect) + 0.3 and log_aspects.min() >= math.log(min_aspect) - 0.3


def test_block_never_exceeds_what_is_left():
    gen = masking.MaskingGenerator(10, min_num_patches=4, max_num_patches=50)
    rng = random.Random(1)
    for left in (1, 2, 3, 5, 9):
        for _ in range(50):
            mask = np.zeros((10, 10), dtype=bool)
            mask[rng.randrange(10), :5] = True
            before = mask.sum()
            new = gen.place_block(mask, left, rng)
            assert 0 <= new <= left and mask.sum() == before + new


# ----------------------------------------------------------------------------------------------------
# BlockMaskSampler
# ----------------------------------------------------------------------------------------------------
def test_parse_mask_ratio():
    assert masking.parse_mask_ratio(0.4) == (0.4, 0.4)
    assert masking.parse_mask_ratio([0.4]) == (0.4, 0.4)
    assert masking.parse_mask_ratio((0.1, 0.5)) == (0.1, 0.5)
    assert masking.parse_mask_ratio(0) == (0.0, 0.0)
    for bad in ((0.5, 0.1), 1.5, -0.1, (0.1, 0.2, 0.3), (), "x", ["a", "b"]):
        with pytest.raises(ValueError, match="--mask_ratio"):
            masking.parse_mask_ratio(bad)


def _masked_ratios(sampler, n, seed):
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        m = sampler(rng)
        assert m.dtype == torch.bool and m.shape == (sampler.num_patches,)
        ratios.append(int(m.sum()) / sampler.num_patches)
    return np.array(ratios)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_fraction_masked_and_fixed_ratio(p):
    n = 3000
    sampler = masking.BlockMaskSampler(224, 16, 16, mask_ratio=0.4, mask_probability=p)
    ratios = _masked_ratios(sampler, n, seed=int(p * 10))
    masked = ratios > 0
    assert abs(masked.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # every masked crop has exactly round(0.4 * 196) = 78 of its 196 patches masked
    assert np.all(ratios[masked] == 78 / 196)


def test_probability_zero_and_one():
    assert np.all(_masked_ratios(masking.BlockMaskSampler(64, 8, 8, 0.4, mask_probability=0.0), 200, 0) == 0)
    assert np.all(_masked_ratios(masking.BlockMaskSampler(64, 8, 8, 0.4, mask_probability=1.0), 200, 0) == 26 / 64)


def test_ratio_range_spreads_over_min_max():
    n, lo, hi = 3000, 0.1, 0.5
    sampler = masking.BlockMaskSampler(224, 16, 16, mask_ratio=(lo, hi), mask_probability=1.0)
    ratios = _masked_ratios(sampler, n, seed=5)
    half_cell = 0.5 / 196
    assert ratios.min() >= lo - half_cell and ratios.max() <= hi + half_cell
    sd = (hi - lo) / math.sqrt(12)  # Uniform(lo, hi)
    assert abs(ratios.mean() - (lo + hi) / 2) < 4 * sd / math.sqrt(n) + half_cell
    counts, _ = np.histogram(ratios, bins=4, range=(lo - half_cell, hi + half_cell))
    assert np.all(np.abs(counts - n / 4) < 5 * math.sqrt(n / 4))
    assert ratios.min() < lo + 0.01 and ratios.max() > hi - 0.01


def test_upsampling_32px_cells_to_16px_patches():
    sampler = masking.BlockMaskSampler(224, 16, 32, mask_ratio=0.4, mask_probability=1.0)
    assert (sampler.cells_per_side, sampler.patches_per_side, sampler.cell_scale) == (7, 14, 2)
    rng = random.Random(0)
    for _ in range(50):
        m = sampler(rng)
        assert m.shape == (196,)
        grid = m.view(14, 14)
        cells = grid[::2, ::2]
        assert torch.equal(grid, cells.repeat_interleave(2, 0).repeat_interleave(2, 1))  # 2x2 blocks
        assert int(cells.sum()) == 20 and int(m.sum()) == 80  # round(0.4 * 49) cells, 4 patches each
    # 8-px patches: 4x4 patches per 32-px cell
    sampler = masking.BlockMaskSampler(224, 8, 32, mask_ratio=(0.1, 0.5), mask_probability=1.0)
    grid = sampler(random.Random(1)).view(28, 28)
    assert torch.equal(grid, grid[::4, ::4].repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert grid.any()


def test_mask_patch_size_equal_patch_size_is_per_patch():
    sampler = masking.BlockMaskSampler(224, 16, 16, 0.4, 1.0)
    assert sampler.cells_per_side == sampler.patches_per_side == 14 and sampler.cell_scale == 1
    assert masking.BlockMaskSampler(224, 16).mask_patch_size == 16  # default: the patch size
    sampler = masking.BlockMaskSampler(32, 4, 4, 0.4, 1.0)
    random.seed(0)
    cells = sampler.sample_cells()
    random.seed(0)
    assert torch.equal(sampler(), torch.from_numpy(cells.reshape(-1)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_patch_size=24), "--mask_patch_size 24 is not a positive multiple of --patch_size 16"),
    (dict(mask_patch_size=8), "--mask_patch_size 8 is not a positive multiple of --patch_size 16"),
    (dict(mask_patch_size=0), "--mask_patch_size 0"),
    (dict(mask_patch_size=48), "--mask_patch_size 48 does not divide --global_crops_size 224"),
    (dict(crop_size=200, mask_patch_size=32), "does not divide --global_crops_size 200"),
    (dict(mask_probability=1.5), "--mask_probability"),
    (dict(mask_ratio=(0.5, 0.2)), "--mask_ratio"),
    (dict(patch_size=0), "--patch_size"),
])
def test_invalid_settings_raise_value_error_naming_the_flag(kwargs, match):
    """ValueError (masking.py imports nothing of the repository), the message naming the flag: main_distill.py
    turns it into its one-line UserError (tests/test_main_distill.py, test_flag_errors)."""
    args = dict(crop_size=224, patch_size=16, mask_patch_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        masking.BlockMaskSampler(**args)


def test_masks_use_python_random_only():
    """Masks depend on Python's random state alone, and leave numpy's and torch's untouched."""
    sampler = masking.BlockMaskSampler(64, 8, 8, (0.1, 0.5), 0.5)
    out = []
    for other in (0, 1):
        np.random.seed(other)
        torch.manual_seed(other)
        np_state, torch_state = np.random.get_state(), torch.get_rng_state()
        random.seed(123)
        out.append(torch.stack([sampler() for _ in range(20)]))
        assert np.array_equal(np.random.get_state()[1], np_state[1])
        assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(out[0], out[1]) and out[0].any()


# ----------------------------------------------------------------------------------------------------
# MaskedCrops, PretrainDataset, build_loader
# ----------------------------------------------------------------------------------------------------
def noise_image(size=(24, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def small_aug(global_size=32, local_size=16, n_local=2):
    return augmentations.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), n_local, global_crops_size=global_size,
                                              local_crops_size=local_size)


def masked_aug(p=1.0, ratio=(0.2, 0.5), mask_patch_size=4):
    return masking.MaskedCrops(small_aug(), masking.BlockMaskSampler(32, 4, mask_patch_size, ratio, p))


def test_masked_crops_keeps_the_crops():
    img = noise_image()
    aug = masked_aug(p=0.5)
    for s in range(5):
        with data.seeded_rng(s):
            crops, masks = aug(img)
        with data.seeded_rng(s):
            plain = aug.transform(img)
        assert len(crops) == len(plain) == 4 and all(torch.equal(a, b) for a, b in zip(crops, plain))
        assert masks.dtype == torch.bool and masks.shape == (2, 64)


def test_masked_crops_checks_the_crop_size():
    aug = masking.MaskedCrops(small_aug(global_size=48), masking.BlockMaskSampler(32, 4, 8))
    with pytest.raises(ValueError, match="48"):
        aug(noise_image())




def collect(loader, epoch):
    """{index: (crops, masks)} from a loader, checking the collated structure."""
    loader.sampler.set_epoch(epoch)
    order = [i for _, i in loader.sampler]
    out, pos = {}, 0
    for (crops, masks), targets, bad in loader:
        B = len(targets)
        assert isinstance(crops, list) and len(crops) == 4
        assert [tuple(c.shape) for c in crops] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * 2
        assert masks.dtype == torch.bool and masks.shape == (B, 2, 64)
        for j in range(B):
            out[order[pos]] = (tuple(c[j].clone() for c in crops), masks[j].clone())
            pos += 1
    assert pos == len(order)
    return out


def test_masks_through_the_loader_are_seeded_per_sample(tiny_folder):
    base = data.build_dataset(str(tiny_folder))
    ds = data.PretrainDataset(base, masked_aug(), seed=7)
    plain = data.PretrainDataset(base, small_aug(), seed=7)
    n = len(ds)
    ref = {i: ds[(2, i)][0] for i in range(n)}
    for i in range(n):  # the crops are those of the unmasked pipeline
        assert all(torch.equal(a, b) for a, b in zip(ref[i][0], plain[(2, i)][0]))
    w0 = collect(data.build_loader(ds, 4, 0, seed=7, drop_last=False), 2)
    w2 = collect(data.build_loader(ds, 3, 2, seed=7, drop_last=False), 2)
    for got in (w0, w2):
        assert sorted(got) == list(range(n))
        for i in range(n):
            assert torch.equal(got[i][1], ref[i][1]), i
            assert all(torch.equal(a, b) for a, b in zip(got[i][0], ref[i][0])), i
    masks = [ref[i][1] for i in range(n)]
    assert all(m.any(1).all() for m in masks)  # mask_probability 1: every global crop is masked
    assert len({m.numpy().tobytes() for m in masks}) == n  # different samples, different masks
    assert all(not torch.equal(m[0], m[1]) for m in masks)  # the two global crops: independent masks
    assert all(not torch.equal(ds[(3, i)][0][1], ref[i][1]) for i in range(n))  # another epoch
    assert torch.equal(ds[(2, 5)][0][1], ref[5][1])


def test_masks_feed_a_multicrop_student(tiny_folder):
    """Crop-major masks [2B, N] line up with torch.cat(crops[:2]) and pass through MultiCropWrapper to a
    ViT built with masked_im_modeling: masked patches become the mask token."""
    import vision_transformer as vits
    ds = data.PretrainDataset(data.build_dataset(str(tiny_folder)), masked_aug(p=0.5), seed=0)
    (crops, masks), _, _ = next(iter(data.build_loader(ds, 4, 0, seed=0)))
    B = masks.shape[0]
    flat = masks.transpose(0, 1).flatten(0, 1)
    assert flat.shape == (2 * B, 64)
    for c in range(2):
        for j in range(B):
            assert torch.equal(flat[c * B + j], masks[j, c])
    backbone = vits.VisionTransformer(img_size=[32], patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                      masked_im_modeling=True)
    with torch.no_grad():
        backbone.mask_token.normal_()
        student = utils.MultiCropWrapper(backbone, torch.nn.Identity())
        out = student(crops[:2], masks=flat)
        assert out.shape == (2 * B, 16) and torch.isfinite(out).all()
        tokens = backbone.prepare_tokens(torch.cat(crops[:2]), flat)[:, 1:] - backbone.pos_embed[:, 1:]
        assert torch.allclose(tokens[flat], backbone.mask_token.expand(int(flat.sum()), -1), atol=1e-5)
        assert not torch.allclose(tokens[~flat][:5], backbone.mask_token.expand(5, -1))
    assert student(crops).shape == ((2 + 2) * B, 16)  # all crops, no masks: as in DINO
