# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Pictures of what a backbone learned, without labels: PCA maps of its patch features, and nearest neighbours.

    # PCA of the last layer's patch features of 8 images sampled from a folder, first 3 components as RGB
    python visualize_features.py pca --arch vit_small --patch_size 16 --pretrained_weights runs/dino/checkpoint.pth \
        --data_path ../shared/data/imagenette/val --num_images 8 --resize_size 224 --bg_threshold 0.5
    # 4 query images and their 6 nearest neighbours (cosine of the CLS features) in a collection extracted once
    python extract_features.py --arch vit_small --pretrained_weights ... --data_path /images --output_dir feats
    python visualize_features.py neighbors --features_dir feats --num_images 4 --k 6

`pca` writes `pca.png` to --output_dir: each image beside its map. The patch features of all the images
together are reduced to their first three principal components (an exact PCA: the eigenvectors of their
covariance), each min-max scaled to [0, 1] over all the images and shown as red, green and blue, as in the
DINOv2 paper (Oquab et al. 2023, Fig. 1). ViTs give their last block's patch tokens; torchvision and timm
convnets their last feature map (ResNet-50 at 224 px: 7x7).
The sign of the first component is chosen so that the image borders (the outer ring of patches of every map,
taken together) score lower than the interiors: the border is mostly background, so the first component
then rises towards the object whatever sign the eigen-solver returned. With `--bg_threshold T` (0 < T < 1),
patches whose first component, min-max scaled over all images, is below T are background, drawn black, and a
second PCA fitted on the foreground patches alone gives the colours (DINOv2's procedure: the object's parts get
the whole colour range). 0 (the default) keeps every patch: on trained weights try 0.5.

`neighbors` writes `neighbors.png`: one row per query image, the query and then its --k nearest neighbours
in the collection by cosine similarity of the CLS features (eval_knn.py's features), the similarity written
above each. The collection is an `extract_features.py` output folder (`--features_dir`, any size: it is read
in blocks), whose meta.json also names the model and transform to embed query images with; or --data_path,
embedded on the fly. A query that is in the collection finds itself first (cosine 1).

Queries and PCA images: `--image_paths`, or `--num_images` sampled from the collection with `--seed`.
"""
import argparse
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import augmentations
import backbones
import checkpointing
import data
import extract_features
import runtime
import utils
from utils import UserError

PAIRS_PER_ROW = 4  # pca.png: image-and-map pairs per row


def get_args_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    backbones.add_model_args(common)  # eval_knn.py's model flags: these pictures show its features
    common.add_argument('--data_path', default='', type=str, help="""Images to sample from (pca, and the
        queries of neighbors) and, for neighbors without --features_dir, the collection to search.""")
    common.add_argument('--data_layout', default='auto', choices=data.LAYOUTS,
                        help='How to read --data_path (as extract_features.py).')
    common.add_argument('--image_paths', default=None, nargs='+', help="""Images to show (pca) or to query
        with (neighbors). Default: --num_images sampled from the collection.""")
    common.add_argument('--num_images', default=8, type=int, help='How many images to sample (with --seed).')
    common.add_argument('--seed', default=0, type=int, help="""Seed of the sampled images, and of the random
        initialisation when no --pretrained_weights are given.""")
    common.add_argument('--output_dir', default='.', help='Where to write pca.png or neighbors.png.')

    parser = argparse.ArgumentParser('Visualize learned features (PCA maps, nearest neighbours)', add_help=False)
    modes = parser.add_subparsers(dest='mode', required=True, metavar='{pca,neighbors}')
    pca = modes.add_parser('pca', parents=[common], help='PCA of the patch features as RGB maps (pca.png)')
    pca.add_argument('--bg_threshold', default=0., type=float, help="""Patches whose first component (min-max
        scaled to [0, 1] over all images) is below this are background: black, and left out of a second PCA
        that colours the rest (DINOv2). 0: off, every patch coloured; try 0.5 with trained weights.""")
    neighbors = modes.add_parser('neighbors', parents=[common],
                                 help='nearest neighbours of query images in a collection (neighbors.png)')
    neighbors.add_argument('--features_dir', default=None, type=str, help="""An extract_features.py output
        folder: the collection to search (features.npy, paths.txt). Its meta.json names the model and the
        transform that embed query images that are not in it (the model flags are then not used).""")
    neighbors.add_argument('--k', default=5, type=int, help='Neighbours shown per query.')
    return parser


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------
def sample(n: int, count: int, seed: int) -> List[int]:
    """`count` distinct indices of range(n), drawn with `seed`, in increasing order."""
    return sorted(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False).tolist())


def load_image_paths(paths: Sequence[str], args: argparse.Namespace) -> torch.Tensor:
    """The images the user named, through the evaluation transform: [N, 3, crop, crop]."""
    transform = data.eval_transform(args.resize_size, args.crop_size)
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--image_paths {path} does not exist or is not a file")
        try:
            images.append(transform(data.pil_loader_rgb(path)))
        except Exception as e:  # PIL raises many types for truncated, corrupt or non-image files
            raise UserError(f"--image_paths {path} is not a readable image: {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from None
    return torch.stack(images)


def load_from_dataset(dataset: data.LabeledDataset, indices: Sequence[int]) -> Tuple[torch.Tensor, List[int]]:
    """The readable ones of `indices` ([N, 3, crop, crop], their indices); the others named and left out."""
    images, kept = [], []
    for i in indices:
        image, _, error = dataset[i]
        if error:
            print(f"WARNING: unreadable image left out: {error}")
            continue
        images.append(image)
        kept.append(i)
    if not images:
        raise UserError("none of the sampled images could be read (see the warnings above)")
    return torch.stack(images), kept


def thumbnail(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] image as the uint8 [H, W, 3] pixels the model was shown."""
    return augmentations.unnormalize(image)


def show_path(path: str, transform) -> np.ndarray:
    """The picture of a collection image (a grey square when it can no longer be read)."""
    try:
        return thumbnail(transform(data.pil_loader_rgb(path)))
    except Exception:
        return np.full((64, 64, 3), 128, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Patch features and their PCA
# ----------------------------------------------------------------------------------------------------
def principal_components(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` [M, D] projected on its first `n` principal components: [M, n]. Exact (eigenvectors of the D x D
    covariance, in float64), so the same patches give the same maps on any machine; each component's sign puts
    its largest loading positive (the eigen-solver's sign is arbitrary)."""
    x = x.double()
    centred = x - x.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues in ascending order
    components = vectors[:, -n:].flip(1)
    largest = components.abs().argmax(dim=0)
    components = components * components[largest, torch.arange(n)].sign()
    return (centred @ components).float()


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Each column scaled to [0, 1]."""
    low, high = x.min(dim=0).values, x.max(dim=0).values
    return (x - low) / (high - low).clamp_min(1e-12)


def border_mask(h: int, w: int) -> torch.Tensor:
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[1:-1, 1:-1] = False
    return mask


def pca_maps(maps: torch.Tensor, bg_threshold: float = 0.) -> Tuple[torch.Tensor, torch.Tensor]:
    """PCA maps of patch features `maps` [B, h, w, D] of several images, fitted on all their patches together.

    Returns (rgb [B, h, w, 3] in [0, 1], foreground [B, h, w] bool). The first component is oriented so that the
    borders score lower than the interiors (see the module docstring); with `bg_threshold` > 0 the patches whose
    min-max-scaled first component is below it are background (black), and the colours come from a second PCA
    of the foreground patches."""
    B, h, w, D = maps.shape
    x = maps.reshape(-1, D).float()
    if x.shape[0] < 3:
        raise UserError(f"{x.shape[0]} patches are too few for a PCA: use larger images (--crop_size)")
    projected = principal_components(x, 3)
    first = projected[:, 0].reshape(B, h, w)
    border = border_mask(h, w).expand(B, h, w)
    if (~border).any() and first[border].mean() > first[~border].mean():
        projected = projected * torch.tensor([-1., 1., 1.])
    if bg_threshold <= 0:
        return minmax(projected).reshape(B, h, w, 3), torch.ones(B, h, w, dtype=torch.bool)
    foreground = minmax(projected[:, :1])[:, 0] >= bg_threshold
    if foreground.sum() < 3:
        raise UserError(f"--bg_threshold {bg_threshold} leaves {int(foreground.sum())} foreground patches, too "
                        "few for the second PCA: lower it")
    rgb = torch.zeros(x.shape[0], 3)
    rgb[foreground] = minmax(principal_components(x[foreground], 3))
    return rgb.reshape(B, h, w, 3), foreground.reshape(B, h, w)


def upsample_nearest(rgb: torch.Tensor, height: int, width: int) -> np.ndarray:
    """[h, w, 3] in [0, 1] -> uint8 [height, width, 3], each patch a flat block."""
    up = nn.functional.interpolate(rgb.permute(2, 0, 1).unsqueeze(0), size=(height, width), mode="nearest")[0]
    return (up.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------------
# Nearest neighbours
# ----------------------------------------------------------------------------------------------------
def read_features_dir(folder: str) -> Tuple[np.ndarray, List[str], Optional[np.ndarray], Dict[str, Any]]:
    """(features [N, D] memory-mapped, paths, labels or None, meta.json) of an extract_features.py folder."""
    meta = extract_features.read_meta(folder)
    if meta is None or not meta.get("complete"):
        raise UserError(f"--features_dir {folder} holds no finished extraction (no meta.json saying complete): "
                        "run extract_features.py to the end first")
    features = np.load(os.path.join(folder, "features.npy"), mmap_mode="r")
    with open(os.path.join(folder, "paths.txt")) as f:
        paths = f.read().splitlines()
    if len(paths) != features.shape[0]:
        raise UserError(f"--features_dir {folder}: {len(paths)} paths for {features.shape[0]} features")
    labels_path = os.path.join(folder, "labels.npy")
    labels = np.load(labels_path) if os.path.isfile(labels_path) else None
    return features, paths, labels, meta


@torch.no_grad()
def top_k(queries: torch.Tensor, collection: np.ndarray, k: int,
          block: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `k` most cosine-similar rows of `collection` [N, D] (an array or a memory map: read `block` rows at a
    time) for each query [Q, D]: (similarities [Q, k], row indices [Q, k]), most similar first."""
    queries = nn.functional.normalize(queries.float(), dim=1)
    best_sims = torch.empty(len(queries), 0)
    best_rows = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, collection.shape[0], block):
        part = torch.from_numpy(np.array(collection[start:start + block], dtype=np.float32))
        sims = torch.cat([best_sims, queries @ nn.functional.normalize(part, dim=1).T], dim=1)
        rows = torch.cat([best_rows, torch.arange(start, start + len(part)).expand(len(queries), -1)], dim=1)
        best_sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
        best_rows = rows.gather(1, order)
    return best_sims, best_rows


def embed_collection(model: nn.Module, dataset: data.LabeledDataset, args: argparse.Namespace,
                     device: torch.device) -> Tuple[np.ndarray, List[int]]:
    """CLS features of a whole dataset (one process), unreadable images left out and named: ([N, D], indices)."""
    loader = data.build_eval_loader(dataset, args.batch_size_per_gpu, args.num_workers)
    features, errors = backbones.extract_features(model, loader, device, use_cuda=False, header="Collection")
    for e in errors:
        print(f"WARNING: unreadable image left out of the collection: {e}")
    keep = backbones.readable_mask(dataset.samples, errors)
    return features[keep].numpy(), torch.nonzero(keep)[:, 0].tolist()


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------
def save_grid(tiles: Sequence[Sequence[Tuple[np.ndarray, str]]], fname: str, dpi: int = 100) -> None:
    """Rows of (uint8 image, caption) tiles as one PNG (matplotlib's Agg canvas: no display needed). A tile is
    as many pixels as its image (224 px images stay sharp), between 120 and 400, its caption above it. Placed by
    hand: tight_layout lets multi-line titles over a single row of images run off the top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows, cols = len(tiles), max(len(r) for r in tiles)
    tile = min(max(max(image.shape[0] for row in tiles for image, _ in row), 120), 400) / dpi  # inches
    caption = 0.06 + 0.14 * max(text.count("\n") + 1 for row in tiles for _, text in row)
    gap = 0.05
    width, height = cols * (tile + gap) + gap, rows * (caption + tile + gap) + gap
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    for r, row in enumerate(tiles):
        for c, (image, text) in enumerate(row):
            left, bottom = gap + c * (tile + gap), height - (r + 1) * (caption + tile + gap)
            ax = fig.add_axes((left / width, bottom / height, tile / width, tile / height))
            ax.imshow(image, interpolation="nearest")
            ax.set_title(text, fontsize=8, pad=2)
            ax.set_axis_off()
    checkpointing.atomic_write(fname, lambda out: fig.savefig(out, dpi=dpi, format="png"))


def short(path: str, width: int = 18) -> str:
    name = os.path.basename(path)
    return name if len(name) <= width else name[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if not args.image_paths and not args.data_path and not (args.mode == "neighbors" and args.features_dir):
        raise UserError("give the images: --image_paths, or --data_path to sample --num_images from")
    if args.num_images < 1:
        raise UserError("--num_images must be at least 1")
    if args.mode == "pca" and not 0 <= args.bg_threshold < 1:
        raise UserError(f"--bg_threshold {args.bg_threshold} is a level of the first component scaled to [0, 1]: "
                        "give a value in [0, 1), e.g. 0.5 (0: no background)")
    if args.mode == "neighbors" and args.k < 1:
        raise UserError("--k must be at least 1")


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    utils.fix_random_seeds(args.seed)  # random weights: the same in every run
    return backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key,
                                      device)


def run_pca(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """pca.png; returns its path, the maps [N, h, w, 3] and the foreground [N, h, w]."""
    if args.image_paths:
        images, names = load_image_paths(args.image_paths, args), list(args.image_paths)
    else:
        dataset = extract_features.build_collection(args)
        images, kept = load_from_dataset(dataset, sample(len(dataset), args.num_images, args.seed))
        names = [dataset.samples[i][0] for i in kept]
    model = build_model(args, device)
    maps = torch.cat([backbones.patch_features(model, batch.to(device), args.arch)[0].float().cpu()
                      for batch in images.split(args.batch_size_per_gpu)])
    rgb, foreground = pca_maps(maps, args.bg_threshold)
    pairs = []
    for image, colours, name in zip(images, rgb, names):
        pairs += [(thumbnail(image), short(name)), (upsample_nearest(colours, *image.shape[-2:]), "PCA")]
    per_row = 2 * min(PAIRS_PER_ROW, len(names))
    fname = os.path.join(args.output_dir, "pca.png")
    save_grid([pairs[i:i + per_row] for i in range(0, len(pairs), per_row)], fname)
    h, w = maps.shape[1:3]
    print(f"PCA of {len(names)} images' {h}x{w} patch features (dimension {maps.shape[-1]})"
          + (f", background below {args.bg_threshold}: {100 * (1 - foreground.float().mean()):.0f}% of the patches"
             if args.bg_threshold > 0 else "") + f". Saved:\n  {fname}")
    return {"png": fname, "rgb": rgb, "foreground": foreground, "names": names}


class Collection(NamedTuple):
    """The images searched: features [N, D] (an array or a memory map), paths, labels (None without), class names;
    the model that embeds other images as they were (None until needed) and meta.json's name of its weights."""
    features: np.ndarray
    paths: List[str]
    labels: Optional[np.ndarray]
    classes: List[str]
    model: Optional[nn.Module]
    weights: Optional[str]


def load_collection(args: argparse.Namespace, device: torch.device) -> Collection:
    """--features_dir (whose meta.json then sets the model and transform flags: the queries are embedded as the
    collection was), else --data_path embedded now."""
    if args.features_dir:
        features, paths, labels, meta = read_features_dir(args.features_dir)
        options = meta["options"]
        for flag in ("arch", "patch_size", "pretrained_weights", "checkpoint_key", "resize_size", "crop_size"):
            setattr(args, flag, options[flag])
        return Collection(features, paths, labels, meta.get("classes", []), None, options["weights"])
    dataset = extract_features.build_collection(args)
    model = build_model(args, device)
    features, kept = embed_collection(model, dataset, args, device)
    labels = np.asarray(dataset.targets)[kept] if data.has_labels(dataset) else None
    return Collection(features, [dataset.samples[i][0] for i in kept], labels, list(dataset.classes), model, None)


def query_features(args: argparse.Namespace, collection: Collection,
                   device: torch.device) -> Tuple[torch.Tensor, List[str]]:
    """The queries' features [Q, D] and names: sampled rows of the collection, or --image_paths (their rows when
    they are in the collection, else embedded by its model)."""
    if not args.image_paths:
        rows = sample(len(collection.paths), args.num_images, args.seed)
        return torch.from_numpy(np.array(collection.features[rows], np.float32)), [collection.paths[r] for r in rows]
    row_of = {os.path.abspath(p): r for r, p in enumerate(collection.paths)}
    known = [row_of.get(os.path.abspath(p)) for p in args.image_paths]
    model = collection.model
    if model is None and None in known:
        weights = collection.weights or ""
        if weights.startswith("sha256:") and "sha256:" + extract_features.sha256_of_file(args.pretrained_weights) \
                != weights:
            raise UserError(f"{args.pretrained_weights} changed since {args.features_dir} was extracted: query "
                            "images would not be embedded as the collection was; extract again")
        model = build_model(args, device)
    with torch.no_grad():
        queries = [torch.from_numpy(np.array(collection.features[r], np.float32)) if r is not None
                   else model(load_image_paths([p], args).to(device))[0].float().cpu()
                   for p, r in zip(args.image_paths, known)]
    return torch.stack(queries), list(args.image_paths)


def run_neighbors(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """neighbors.png; returns its path, the similarities and rows [Q, k] and the collection's paths."""
    collection = load_collection(args, device)
    queries, names = query_features(args, collection, device)
    sims, rows = top_k(queries, collection.features, args.k)

    def caption(row: Optional[int], head: str) -> str:  # with the class name, when there are labels
        if row is None or collection.labels is None or not collection.classes:
            return head
        return f"{head}\n{collection.classes[int(collection.labels[row])]}"
    transform = data.eval_transform(args.resize_size, args.crop_size)  # the pictures: what the model saw
    row_of = {p: r for r, p in enumerate(collection.paths)}
    tiles = []
    for name, query_sims, query_rows in zip(names, sims.tolist(), rows.tolist()):
        tiles.append([(show_path(name, transform), caption(row_of.get(name), "query"))] +
                     [(show_path(collection.paths[r], transform), caption(r, f"cos {s:.3f}"))
                      for s, r in zip(query_sims, query_rows)])
    fname = os.path.join(args.output_dir, "neighbors.png")
    save_grid(tiles, fname)
    print(f"{args.k} nearest neighbours of {len(names)} images among {len(collection.paths)}. Saved:\n  {fname}")
    return {"png": fname, "similarities": sims, "rows": rows, "paths": collection.paths, "queries": names}


def visualize_features(args: argparse.Namespace) -> Dict[str, Any]:
    check_args(args)
    runtime.check_output_dir(args.output_dir)  # before the work, not after
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return run_pca(args, device) if args.mode == "pca" else run_neighbors(args, device)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Visualize learned features (PCA maps, nearest neighbours)',
                                     parents=[get_args_parser()])
    runtime.run_script(visualize_features, parser.parse_args())
