# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Images with class-index masks, for the dense probe (eval_segmentation.py).

- `segmentation_splits(data_path, ...)`: the train and val pairs of a folder (`train/images` + `train/masks`,
  `val/...`; or ADE20K's own `images/training` + `annotations/training`, `.../validation`), or of `synthetic`
  (the generated shapes with their masks, synthetic.py).
- `SegmentationDataset`: `(image, mask, error)` items, image and mask transformed together (`JointTransform`):
  random resized crops and flips for training, resize and center crop for validation; the mask by nearest
  neighbour, so that it keeps class indices. `error` names what is wrong with a pair (sizes that differ, a class
  index out of range, an unreadable file) instead of raising inside a loader worker: the script stops with it.

A mask is a single-channel PNG (mode L or P) of class indices, pairs matched by file name without extension
(`x.jpg` <-> `x.png`). `ignore_index` marks pixels left out of the loss and the metrics; `reduce_zero_label`
(ADE20K's raw annotations, where 0 means "other") maps 0 to ignore and every other index i to i - 1.
"""
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

import augmentations
import data
import synthetic
from utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# (images, masks) folders of each split, in the layouts we read: ours, then ADE20K's (ADEChallengeData2016)
LAYOUTS = ({"train": ("train/images", "train/masks"), "val": ("val/images", "val/masks")},
           {"train": ("images/training", "annotations/training"),
            "val": ("images/validation", "annotations/validation")})


class Pairs(NamedTuple):
    samples: List[Tuple[str, str]]  # (image path, mask path), sorted by name
    classes: List[str]  # class names when the data says them (synthetic), else []


def _files_by_stem(folder: str, what: str) -> Dict[str, str]:
    """name without extension (relative to `folder`, sub-folders included) -> path, for the image files."""
    found: Dict[str, str] = {}
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTENSIONS:
                key = os.path.relpath(os.path.join(parent, stem), folder)
                if key in found:
                    raise UserError(f"two {what} files are named {key}: {found[key]} and {os.path.join(parent, f)}; "
                                    "pairs are matched by name, so keep one")
                found[key] = os.path.join(parent, f)
    return found


def list_pairs(images_dir: str, masks_dir: str) -> List[Tuple[str, str]]:
    """(image, mask) paths matched by name; an image without a mask stops with a message naming it."""
    images = _files_by_stem(images_dir, "image")
    if not images:
        raise UserError(f"no image in {images_dir}: give a folder of images (.jpg, .png, ...)")
    masks = _files_by_stem(masks_dir, "mask")
    missing = [images[k] for k in sorted(images) if k not in masks]
    if missing:
        raise UserError(f"{len(missing)} of the {len(images)} images in {images_dir} have no mask of the same name in "
                        f"{masks_dir}, e.g. {missing[0]} (expected {os.path.join(masks_dir, os.path.splitext(os.path.relpath(missing[0], images_dir))[0])}.png): "
                        "add the masks or remove those images")
    unused = len(set(masks) - set(images))
    if unused:
        print(f"Note: {unused} masks in {masks_dir} have no image; they are not used.")
    return [(images[k], masks[k]) for k in sorted(images)]


def segmentation_splits(data_path: str, cache_dir: Optional[str] = None) -> Tuple[Pairs, Pairs]:
    """The train and val pairs of `data_path` (a folder in one of LAYOUTS, or `synthetic[:/cache/dir]`)."""
    classes: List[str] = []
    if data_path == "synthetic" or data_path.startswith("synthetic:"):
        root = synthetic.make_synthetic_segmentation(data_path.partition(":")[2] or cache_dir)
        classes = ["background"] + list(synthetic.SYNTHETIC_CLASSES)
        layout = LAYOUTS[0]
    else:
        if not os.path.isdir(data_path):
            raise UserError(f"--data_path {data_path} is not a folder: give a folder with train/images, train/masks, "
                            "val/images and val/masks (or ADE20K's images/ and annotations/), or 'synthetic'")
        root = data_path
        layout = next((lay for lay in LAYOUTS if all(os.path.isdir(os.path.join(root, d))
                                                      for pair in lay.values() for d in pair)), None)
        if layout is None:
            raise UserError(f"--data_path {data_path} holds neither train/images, train/masks, val/images and "
                            "val/masks nor ADE20K's images/{training,validation} and annotations/{training,validation}:"
                            " put the images and their class-index masks (PNG, same names) in those folders")
    train, val = (list_pairs(os.path.join(root, layout[s][0]), os.path.join(root, layout[s][1]))
                  for s in ("train", "val"))
    return Pairs(train, classes), Pairs(val, classes)


# ----------------------------------------------------------------------------------------------------
# Image and mask transformed together
# ----------------------------------------------------------------------------------------------------
class JointTransform:
    """PIL image and mask -> (normalised image [3, S, S], mask [S, S] int64) of side `crop_size`.

    Training (`train`): a random resized crop (area `scale` of the image, official aspect ratios) and a
    horizontal flip, the same on both; validation: resize of the short side to `resize_size`, center crop."""

    def __init__(self, resize_size: int, crop_size: int, train: bool, scale: Tuple[float, float] = (0.25, 1.0)):
        self.resize_size, self.crop_size, self.train, self.scale = resize_size, crop_size, train, scale

    def __call__(self, image: Image.Image, mask: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        from torchvision import transforms
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        size = [self.crop_size, self.crop_size]
        if self.train:
            top, left, h, w = transforms.RandomResizedCrop.get_params(image, self.scale, (3. / 4., 4. / 3.))
            image = F.resized_crop(image, top, left, h, w, size, InterpolationMode.BICUBIC)
            mask = F.resized_crop(mask, top, left, h, w, size, InterpolationMode.NEAREST)
            if torch.rand(1).item() < 0.5:
                image, mask = F.hflip(image), F.hflip(mask)
        else:
            image = F.center_crop(F.resize(image, self.resize_size, InterpolationMode.BICUBIC), size)
            mask = F.center_crop(F.resize(mask, self.resize_size, InterpolationMode.NEAREST), size)
        image = F.normalize(F.to_tensor(image), augmentations.IMAGENET_DEFAULT_MEAN, augmentations.IMAGENET_DEFAULT_STD)
        return image, torch.from_numpy(np.array(mask, dtype=np.int64))


def read_mask(path: str) -> Image.Image:
    """A class-index mask as a mode L or I image (a palette PNG's indices, not its colours)."""
    with open(path, "rb") as f:
        mask = Image.open(f)
        mask.load()
    if mask.mode == "P":
        return Image.fromarray(np.array(mask, dtype=np.uint8), mode="L")  # the indices, whatever the palette
    if mask.mode in ("L", "I", "I;16"):
        return mask if mask.mode == "L" else mask.convert("I")
    raise ValueError(f"a mask must have one channel of class indices (mode L or P), this one is {mask.mode}")


class SegmentationDataset(data.SeededItems):
    """`(image, mask, error)` for the (image path, mask path) `samples`.

    `mask` holds class indices in [0, num_classes) and `ignore_index`. `error` is "" or says what is wrong with the
    pair, naming the files (a zero image and an all-ignored mask stand in): the script stops with it. With a
    `seed`, a key `(epoch, index)` (an EpochSampler's) runs the random transform under the per-sample seed of
    (seed, epoch, index), the same whatever the workers and after a mid-epoch resume (data.LabeledDataset)."""

    def __init__(self, samples: Sequence[Tuple[str, str]], transform: JointTransform, num_classes: int,
                 ignore_index: int = 255, reduce_zero_label: bool = False, seed: Optional[int] = None):
        self.samples, self.transform = list(samples), transform
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.seed = seed

    def _blank(self, error: str):
        size = self.transform.crop_size
        return torch.zeros(3, size, size), torch.full((size, size), self.ignore_index, dtype=torch.int64), error

    def _item(self, index: int):
        image_path, mask_path = self.samples[index]
        try:
            image = data.pil_loader_rgb(image_path)
        except Exception as e:
            return self._blank(f"cannot read the image {image_path}: {type(e).__name__}: {' '.join(str(e).split())}")
        try:
            mask = read_mask(mask_path)
        except Exception as e:
            return self._blank(f"cannot read the mask {mask_path}: {type(e).__name__}: {' '.join(str(e).split())}")
        if mask.size != image.size:
            return self._blank(f"the mask {mask_path} is {mask.size[0]}x{mask.size[1]} px but its image {image_path} "
                               f"is {image.size[0]}x{image.size[1]}: a mask must have its image's size")
        image, target = self.transform(image, mask)
        if self.reduce_zero_label:  # ADE20K: 0 is "other", ignored; the 150 classes are 1..150
            target = torch.where(target == 0, self.ignore_index, target - 1)
            target[target == self.ignore_index - 1] = self.ignore_index
        bad = (target >= self.num_classes) & (target != self.ignore_index) | (target < 0)
        if bad.any():
            value = int(target[bad][0]) + (1 if self.reduce_zero_label else 0)
            return self._blank(f"the mask {mask_path} holds the class index {value}, outside 0..{self.num_classes - 1} "
                               f"(--num_classes {self.num_classes}" + (", --reduce_zero_label" if self.reduce_zero_label
                                                                      else "") +
                               f") and not the ignore value {self.ignore_index}: raise --num_classes, or set "
                               "--ignore_index to the value that marks unlabelled pixels")
        return image, target, ""


def build_datasets(data_path: str, resize_size: int, crop_size: int, num_classes: Optional[int],
                   ignore_index: int, reduce_zero_label: bool, seed: int,
                   cache_dir: Optional[str] = None) -> Tuple[SegmentationDataset, SegmentationDataset, List[str]]:
    """Train (randomly cropped and flipped, seeded per sample) and val datasets of `data_path`, and the class
    names (`class_<i>` where the data does not name them). `num_classes` None: the data's (synthetic) or an error."""
    train, val = segmentation_splits(data_path, cache_dir)
    if num_classes is None:
        if not train.classes:
            raise UserError(f"give --num_classes: the number of classes of the masks in {data_path}")
        num_classes = len(train.classes)
    elif train.classes and num_classes != len(train.classes):
        raise UserError(f"--num_classes {num_classes}, but {data_path} has {len(train.classes)} classes "
                        f"({', '.join(train.classes)}): leave --num_classes out")
    classes = train.classes or [f"class_{i}" for i in range(num_classes)]
    common = dict(num_classes=num_classes, ignore_index=ignore_index, reduce_zero_label=reduce_zero_label)
    return (SegmentationDataset(train.samples, JointTransform(resize_size, crop_size, True), seed=seed, **common),
            SegmentationDataset(val.samples, JointTransform(resize_size, crop_size, False), **common), classes)


def palette(num_classes: int) -> np.ndarray:
    """[num_classes + 1, 3] uint8 colours, distinct for neighbouring indices (Pascal VOC's bit-interleaved
    palette); the last row, grey, shows ignored pixels."""
    colours = np.zeros((num_classes + 1, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    colours[num_classes] = (128, 128, 128)
    return colours


def colourise(mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 colours (ignored pixels grey)."""
    index = np.where((mask == ignore_index) | (mask < 0) | (mask >= num_classes), num_classes, mask)
    return palette(num_classes)[index]
