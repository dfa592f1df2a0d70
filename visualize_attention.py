# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Flags, outputs and the attention/threshold computation follow facebookresearch/dino's
# visualize_attention.py (Apache 2.0).
"""Self-attention maps of a trained ViT: the last block's CLS query over the patches, one image per head.

    python visualize_attention.py --arch vit_small --patch_size 8 \
        --pretrained_weights runs/dino/checkpoint.pth --image_path img.jpg --threshold 0.6

Writes to --output_dir: `img.png` (the input after resize and crop), `attn-head{j}.png` for every head j
and, with --threshold, `mask_th{threshold}_head{j}.png`: the smallest set of patches that holds that
fraction of the head's attention mass, overlaid on the image.

Differences from the official script, none of which changes an attention value or a mask:
- nothing is ever downloaded: without --pretrained_weights the weights are random (with a loud warning),
  without --image_path a generated image (a synthetic shape) is used;
- `img.png` is the exact inverse of the ImageNet normalisation (the official min-max stretches it);
- the mask overlay is drawn with numpy and matplotlib's contour (the official uses scikit-image and
  OpenCV, not dependencies here) and has the size of the image (the official saves 500x500 figures);
- weights load through `checkpointing.load_pretrained_weights`: our checkpoints, official full and backbone-only
  checkpoints; weights that do not fit the model stop with a message instead of loading partially.
"""
import argparse
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import augmentations
import backbones
import checkpointing
import data
import runtime
import synthetic
import utils

# The official overlay draws one instance in the first of its `random_colors(1)`: HSV (0, 1, 1), red.
MASK_COLOR = (1.0, 0.0, 0.0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Visualize Self-Attention maps', add_help=False)
    backbones.add_model_args(parser, patch_size=8, images=False)  # --arch, --patch_size 8, weights
    parser.add_argument("--image_path", default=None, type=str, help="""Path of the image to load. None: a
        generated image of a synthetic shape (never a download).""")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+", help="""Resize image: height
        and width, or one value for the short side (aspect ratio kept). The result is cropped to a multiple
        of the patch size.""")
    parser.add_argument('--output_dir', default='.', help='Path where to save visualizations.')
    parser.add_argument("--threshold", type=float, default=None, help="""We visualize masks
        obtained by thresholding the self-attention maps to keep xx%% of the mass (a fraction, e.g. 0.6).""")
    return parser


# ----------------------------------------------------------------------------------------------------
# Input image
# ----------------------------------------------------------------------------------------------------
def load_image(image_path: Optional[str]) -> Image.Image:
    """The RGB image at `image_path`, or a generated one when there is none (the official script would
    download the first image of the paper; we never download)."""
    if image_path is None:
        print("Please use the `--image_path` argument to indicate the path of the image you wish to visualize.")
        print("Since no image path has been provided, we use a generated image (a synthetic star shape).")
        # A star on a gradient, 224 px so that the resize to --image_size stays smooth; seed 3 centres it.
        return synthetic.synthetic_image(synthetic.SYNTHETIC_CLASSES.index("star"), np.random.default_rng(3), size=224)
    if not os.path.isfile(image_path):
        raise utils.UserError(f"--image_path {image_path} does not exist or is not a file")
    try:
        return data.pil_loader_rgb(image_path)
    except Exception as e:  # PIL raises many types for truncated, corrupt or non-image files
        raise utils.UserError(f"--image_path {image_path} is not a readable image: {type(e).__name__}: "
                              f"{' '.join(str(e).split())}") from None


def preprocess(img: Image.Image, image_size: Sequence[int], patch_size: int) -> torch.Tensor:
    """Resize, normalise, then crop bottom/right to a multiple of the patch size: [1, 3, H, W]."""
    from torchvision import transforms as pth_transforms
    transform = pth_transforms.Compose([
        pth_transforms.Resize(list(image_size)),
        pth_transforms.ToTensor(),
        pth_transforms.Normalize(augmentations.IMAGENET_DEFAULT_MEAN, augmentations.IMAGENET_DEFAULT_STD),
    ])
    img = transform(img)
    # make the image divisible by the patch size (official names: `w` is the height, `h` the width)
    w, h = img.shape[1] - img.shape[1] % patch_size, img.shape[2] - img.shape[2] % patch_size
    if w == 0 or h == 0:
        raise utils.UserError(f"--image_size {' '.join(map(str, image_size))} resizes the image to "
                              f"{img.shape[1]}x{img.shape[2]}, smaller than one {patch_size}x{patch_size} patch")
    return img[:, :w, :h].unsqueeze(0)


# ----------------------------------------------------------------------------------------------------
# Attention maps and masks
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """Attention of the last block's CLS query to every patch: [heads, number of patches]."""
    attentions = model.get_last_selfattention(img)
    nh = attentions.shape[1]  # number of heads
    # we keep only the output patch attention (not the CLS token's, nor the registers')
    return attentions[0, :, 0, model.num_prefix_tokens:].reshape(nh, -1).float()


def threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the smallest set of patches holding `threshold` of the attention mass: bool [heads, N].

    The official computation: sort ascending, normalise, and keep the patches whose cumulative mass
    (up to and including them) exceeds 1 - threshold, i.e. the largest ones holding >= threshold.
    """
    val, idx = torch.sort(attentions)
    val = val / torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)  # undo the sort, head by head
    return torch.gather(th_attn, 1, idx2)


def upsample(maps: torch.Tensor, w_featmap: int, h_featmap: int, patch_size: int) -> np.ndarray:
    """[heads, N] patch values -> [heads, H, W] pixels, each patch value repeated over its patch."""
    maps = maps.reshape(maps.shape[0], w_featmap, h_featmap).float()
    return nn.functional.interpolate(maps.unsqueeze(0), scale_factor=patch_size, mode="nearest")[0].cpu().numpy()


def apply_mask(image: np.ndarray, mask: np.ndarray, color: Tuple[float, float, float],
               alpha: float = 0.5) -> np.ndarray:
    """Blend `color` into `image` (uint8 [H, W, 3]) where `mask` is 1, as the official overlay does."""
    out = image.astype(np.float64)
    for c in range(3):
        out[:, :, c] = out[:, :, c] * (1 - alpha * mask) + alpha * mask * color[c] * 255
    return out.astype(np.uint8)  # truncates, as the official uint32 arithmetic does


def save_mask_overlay(image: np.ndarray, mask: np.ndarray, fname: str,
                      color: Tuple[float, float, float] = MASK_COLOR, alpha: float = 0.5) -> None:
    """The image with the mask blended in and its outline drawn, saved at the image's size."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    height, width = image.shape[:2]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, frameon=False)
    ax = fig.add_axes((0., 0., 1., 1.))
    ax.set_axis_off()
    ax.imshow(apply_mask(image, mask, color, alpha), interpolation="nearest")
    if mask.any():
        # Pad so that masks touching the border get closed outlines; the grid is shifted back by one
        # pixel so that the 0.5 level runs between pixel centres, as skimage's find_contours would.
        padded = np.zeros((height + 2, width + 2))
        padded[1:-1, 1:-1] = mask
        ax.contour(np.arange(width + 2) - 1, np.arange(height + 2) - 1, padded, levels=[0.5],
                   colors=[color], linewidths=1)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    checkpointing.atomic_write(fname, lambda f: fig.savefig(f, dpi=dpi, format="png"))


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if not backbones.is_vit(args.arch):
        raise utils.UserError(f"--arch {args.arch} has no self-attention maps to show: use one of "
                              f"{backbones.OUR_VITS} (or a deit_* alias)")
    if len(args.image_size) not in (1, 2) or min(args.image_size) < 1:
        raise utils.UserError(f"--image_size takes one (short side) or two (height width) positive values, "
                              f"not {' '.join(map(str, args.image_size))}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise utils.UserError(f"--threshold {args.threshold} is a fraction of the attention mass: give a "
                              "value in (0, 1], e.g. 0.6")


def attention_maps(args: argparse.Namespace) -> Tuple[torch.Tensor, np.ndarray, Optional[np.ndarray]]:
    """The input image [1, 3, H, W] (normalised, cropped), the attention maps [heads, H, W] and, with
    --threshold, the masks [heads, H, W] (1 where kept)."""
    check_args(args)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    patch_size = backbones.patch_size_of(args.arch, args.patch_size)
    img = preprocess(load_image(args.image_path), args.image_size, patch_size)  # a bad image fails fast
    model = backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key,
                                      device)

    w_featmap = img.shape[-2] // patch_size
    h_featmap = img.shape[-1] // patch_size
    attentions = cls_attention(model, img.to(device))
    th_attn = None
    if args.threshold is not None:
        th_attn = upsample(threshold_masks(attentions, args.threshold), w_featmap, h_featmap, patch_size)
    return img, upsample(attentions, w_featmap, h_featmap, patch_size), th_attn


def visualize_attention(args: argparse.Namespace) -> List[str]:
    """Write the images; return their paths."""
    check_args(args)
    runtime.check_output_dir(args.output_dir)  # before the work, not after
    img, attentions, th_attn = attention_maps(args)
    nh, patch_size = attentions.shape[0], backbones.patch_size_of(args.arch, args.patch_size)

    # save attentions heatmaps
    import matplotlib.image  # imsave without pyplot: same file as plt.imsave, no GUI backend needed
    image = augmentations.unnormalize(img)
    paths = [os.path.join(args.output_dir, "img.png")]
    checkpointing.atomic_write(paths[0], lambda f: Image.fromarray(image).save(f, format="PNG"))
    for j in range(nh):
        fname = os.path.join(args.output_dir, "attn-head" + str(j) + ".png")
        checkpointing.atomic_write(fname, lambda f: matplotlib.image.imsave(f, arr=attentions[j], format='png'))
        paths.append(fname)
    if th_attn is not None:
        for j in range(nh):
            fname = os.path.join(args.output_dir, "mask_th" + str(args.threshold) + "_head" + str(j) + ".png")
            save_mask_overlay(image, th_attn[j], fname)
            paths.append(fname)

    print(f"Attention of the last block's CLS token, {nh} heads, on the {img.shape[-2]}x{img.shape[-1]} image "
          f"({img.shape[-2] // patch_size}x{img.shape[-1] // patch_size} patches). Saved:")
    for p in paths:
        print(f"  {p}")
    return paths


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Visualize Self-Attention maps', parents=[get_args_parser()])
    runtime.run_script(visualize_attention, parser.parse_args())
