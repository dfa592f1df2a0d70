# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The default dataset, generated offline: 10 classes of shapes (`synthetic_image`), written once as an
ImageFolder tree (`make_synthetic_dataset`) and read by `--data_path synthetic` like any other folder; the same
images with their segmentation masks (`make_synthetic_segmentation`), eval_segmentation.py's `synthetic`.

Imports numpy, PIL and the standard library only.
"""
import functools
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


# Bumped whenever the images change: it is part of the cache folder's name, so an older dataset is never reused.
SYNTHETIC_VERSION = 2
SYNTHETIC_CLASSES = ("bars", "checker", "circle", "crescent", "cross", "hexagon", "ring", "square", "star",
                     "triangle")

def _regular_polygon(cx, cy, r, n, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]

def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]

def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float,
                fg: Union[int, Tuple[int, int, int]], bg: Union[int, Tuple[int, int, int]]) -> None:
    """Draw shape `name` of radius r, centred at (cx, cy), rotated by `angle`, in `fg`; holes in `bg`."""
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

# What every image shares with the others: three shapes of its class, each covering the same share of the
# image whatever the class, light grey on a dark background with a little noise; only the positions and
# rotations vary. Why so plain: DINO first learns whatever two crops of one image share and other images do
# not; given coloured shapes on coloured backgrounds it learns the colours (k-NN on the classes falls), here
# the shape is all there is to learn. Equal areas keep a plain brightness statistic from telling the classes apart,
# so that a random network separates them poorly (docs/training.md).
SHAPES_PER_IMAGE = 3
SHAPE_AREA = 0.07  # share of the image covered by each shape, before overlaps
BACKGROUND, FOREGROUND, NOISE = 0.12, 0.88, 0.03  # grey levels in [0, 1], noise standard deviation


@functools.lru_cache(maxsize=None)
def _area_at_unit_radius(name: str) -> float:
    """Area of shape `name` drawn with r = 1 (measured on a 512 px mask)."""
    n = 512
    mask = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(mask), name, n / 2, n / 2, n / 4, 0.3, 255, 0)
    return float((np.asarray(mask) > 127).mean()) * 16

def _shapes_and_mask(class_index: int, rng: np.random.Generator, size: int) -> Tuple[Image.Image, np.ndarray]:
    """The image of `synthetic_image` and its coverage: [size, size] float32, the share of each pixel the
    shapes cover (their anti-aliased edges are fractions). Draws from `rng` exactly as the image alone does."""
    ss = 4  # draw at 4x the size, then box-downsample: anti-aliased edges
    big = size * ss
    name = SYNTHETIC_CLASSES[class_index]
    r = math.sqrt(SHAPE_AREA * big * big / _area_at_unit_radius(name))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(SHAPES_PER_IMAGE):
        cx, cy = rng.uniform(0.7 * r, big - 0.7 * r), rng.uniform(0.7 * r, big - 0.7 * r)
        _draw_shape(draw, name, cx, cy, r, rng.uniform(0, 2 * math.pi), 255, 0)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255
    grey = BACKGROUND + (FOREGROUND - BACKGROUND) * alpha + rng.normal(0, NOISE, (size, size))
    grey = np.clip(np.round(grey * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB"), alpha

def synthetic_image(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `class_index`: `SHAPES_PER_IMAGE` shapes of the class at random positions and
    rotations, each of area `SHAPE_AREA` x the image, light on dark, with noise (see above)."""
    return _shapes_and_mask(class_index, rng, size)[0]

def synthetic_image_and_mask(class_index: int, rng: np.random.Generator,
                             size: int = 64) -> Tuple[Image.Image, Image.Image]:
    """`synthetic_image` (the same image for the same `rng`) and its segmentation mask: a mode "L" image of class
    indices, 0 for the background and 1 + `class_index` where the shapes cover at least half of a pixel."""
    image, alpha = _shapes_and_mask(class_index, rng, size)
    return image, Image.fromarray(np.where(alpha >= 0.5, class_index + 1, 0).astype(np.uint8), mode="L")

def default_synthetic_root() -> str:
    return os.environ.get("DINO_SYNTHETIC_ROOT", os.path.join(REPO_ROOT, "data_cache"))

def _write_once(cache_dir: Optional[str], name: str, params: dict, write: Callable[[str], None]) -> str:
    """`<cache>/<name>`, written once by `write(folder)` with `params` in its dataset.json; reused when complete.
    Safe when several processes call it at once (each writes a temporary folder and renames it into place)."""
    cache_dir = cache_dir or default_synthetic_root()
    root = os.path.join(cache_dir, name)
    marker = os.path.join(root, "dataset.json")
    if os.path.isfile(marker):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
    try:
        write(tmp)
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

def _splits(num_train_per_class: int, num_val_per_class: int, seed: int):
    """(split, class index, class name, image index, rng) of every image, in the order the rngs are consumed."""
    for split, per_class, split_seed in (("train", num_train_per_class, 0), ("val", num_val_per_class, 1)):
        for c, cls in enumerate(SYNTHETIC_CLASSES):
            rng = np.random.default_rng([seed, split_seed, c])
            for i in range(per_class):
                yield split, c, cls, i, rng

def _name(kind: str, image_size: int, num_train_per_class: int, num_val_per_class: int, seed: int) -> str:
    return (f"synthetic-{kind}-v{SYNTHETIC_VERSION}-s{image_size}-n{num_train_per_class}-{num_val_per_class}"
            f"-seed{seed}")

def make_synthetic_dataset(cache_dir: Optional[str] = None, num_train_per_class: int = 300,
                           num_val_per_class: int = 60, image_size: int = 64, seed: int = 0) -> str:
    """Write (once) a 10-class shapes dataset as `<cache>/synthetic-.../{train,val}/<class>/*.png`.

    Deterministic for a given seed; reused when already complete. Safe when several processes call it
    at once. Returns the dataset root.
    """
    params = {"classes": list(SYNTHETIC_CLASSES), "train_per_class": num_train_per_class,
              "val_per_class": num_val_per_class, "image_size": image_size, "seed": seed, "version": SYNTHETIC_VERSION}

    def write(folder: str) -> None:
        for split, c, cls, i, rng in _splits(num_train_per_class, num_val_per_class, seed):
            os.makedirs(os.path.join(folder, split, cls), exist_ok=True)
            # PNG: JPEG would ring around the sharp edges
            synthetic_image(c, rng, image_size).save(os.path.join(folder, split, cls, f"{cls}_{i:05d}.png"))
    return _write_once(cache_dir, _name("shapes", image_size, num_train_per_class, num_val_per_class, seed),
                       params, write)

def make_synthetic_segmentation(cache_dir: Optional[str] = None, num_train_per_class: int = 300,
                                num_val_per_class: int = 60, image_size: int = 64, seed: int = 0) -> str:
    """Write (once) the images of `make_synthetic_dataset` (the same pixels, for the same arguments) with their
    masks, as `<cache>/synthetic-shapes-seg-.../{train,val}/{images,masks}/<class>_<i>.png`: a dense benchmark of
    11 classes (0 background, 1 + the index of each shape kind in SYNTHETIC_CLASSES). Returns the root."""
    classes = ["background"] + list(SYNTHETIC_CLASSES)
    params = {"classes": classes, "train_per_class": num_train_per_class, "val_per_class": num_val_per_class,
              "image_size": image_size, "seed": seed, "version": SYNTHETIC_VERSION}

    def write(folder: str) -> None:
        for split, c, cls, i, rng in _splits(num_train_per_class, num_val_per_class, seed):
            image, mask = synthetic_image_and_mask(c, rng, image_size)
            for kind, picture in (("images", image), ("masks", mask)):
                os.makedirs(os.path.join(folder, split, kind), exist_ok=True)
                picture.save(os.path.join(folder, split, kind, f"{cls}_{i:05d}.png"))
    return _write_once(cache_dir, _name("shapes-seg", image_size, num_train_per_class, num_val_per_class, seed),
                       params, write)
