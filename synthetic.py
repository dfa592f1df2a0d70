# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The default dataset, generated offline: 10 classes of shapes (`synthetic_image`), written once as an
ImageFolder tree (`make_synthetic_dataset`) and read by `--data_path synthetic` like any other folder.

Imports numpy, PIL and the standard library only.
"""
import functools
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Tuple, Union

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

def synthetic_image(class_index: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `class_index`: `SHAPES_PER_IMAGE` shapes of the class at random positions and
    rotations, each of area `SHAPE_AREA` x the image, light on dark, with noise (see above)."""
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
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")

def default_synthetic_root() -> str:
    return os.environ.get("DINO_SYNTHETIC_ROOT", os.path.join(REPO_ROOT, "data_cache"))

def make_synthetic_dataset(cache_dir: Optional[str] = None, num_train_per_class: int = 300,
                           num_val_per_class: int = 60, image_size: int = 64, seed: int = 0) -> str:
    """Write (once) a 10-class shapes dataset as `<cache>/synthetic-.../{train,val}/<class>/*.png`.

    Deterministic for a given seed; reused when already complete. Safe when several processes call it
    at once (each writes to a temporary folder and renames it into place). Returns the dataset root.
    """
    cache_dir = cache_dir or default_synthetic_root()
    name = (f"synthetic-shapes-v{SYNTHETIC_VERSION}-s{image_size}-n{num_train_per_class}-{num_val_per_class}"
            f"-seed{seed}")
    root = os.path.join(cache_dir, name)
    params = {"classes": list(SYNTHETIC_CLASSES), "train_per_class": num_train_per_class,
              "val_per_class": num_val_per_class, "image_size": image_size, "seed": seed, "version": SYNTHETIC_VERSION}
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
                    # PNG: JPEG would ring around the sharp edges
                    synthetic_image(c, rng, image_size).save(os.path.join(folder, f"{cls}_{i:05d}.png"))
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
