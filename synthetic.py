# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The default dataset, generated offline: 10 classes of shapes (`synthetic_image`), written once as an
ImageFolder tree (`make_synthetic_dataset`) and read by `--data_path synthetic` like any other folder.

Imports numpy, PIL and the standard library only.
"""
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


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
