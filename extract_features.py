# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Embeddings of any image collection, written to disk: sharded over processes, in flat memory, resumable.

    python extract_features.py --arch vit_small --patch_size 16 --pretrained_weights runs/dino/checkpoint.pth \
        --data_path /path/to/images --output_dir out/features
    torchrun --nproc_per_node=8 extract_features.py ...    # the same files, each process on its share

`--data_path` is anything `data.build_dataset` reads: an ImageFolder tree (labels kept), an unlabeled folder
of images at any depth or a text file listing image paths (`--data_layout`), a packed file, `synthetic`.
The model flags are eval_knn.py's (the same names, defaults and weight formats), so that the features are
those eval_knn.py classifies. `--pretrained_weights model.onnx` (export_backbone.py's ONNX file) runs the
exported graph with onnxruntime on the CPU instead, with the same features within the export's tolerance.

Writes to --output_dir:
- `features.npy`    [N, D] the CLS embedding of a ViT (model(images) for other models), L2-normalised unless
                    `--normalize false`, float32 or `--dtype float16`; row i is the image on line i of
- `paths.txt`       the images' paths (as the dataset names them), one per line, in dataset order;
- `labels.npy`      [N] int64 class indices, when the data has labels (an ImageFolder; names in meta.json);
- `patch_features.npy` with `--patch_tokens true` (ViTs): the average of the last block's patch tokens,
                    normalised and stored as features.npy;
- `skipped.txt`     every image that could not be read, `path: reason`, one per line (none of them is in
                    the other files; the file is empty when all were read);
- `meta.json`       what was extracted (options, weights, dimensions, count, classes).

The dataset is processed in chunks of --chunk_size images. Each chunk is written to `parts/chunk_00012.npz`
(atomically: a temporary file, then a rename) as soon as it is done; at the end the parts are copied into the
final files one part at a time and removed. Memory stays at one chunk whatever the number of images, and a
run that is stopped (Ctrl-C, SIGTERM, kill -9, a crash) continues where it stopped when the same command is
run again. A rerun with other options (weights, data, normalisation, dtype...) refuses to mix its output with
the folder's, and a finished folder is left as it is.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Subset

import backbones
import checkpointing
import data
import runtime
import utils
from utils import UserError

FORMAT = "dino-features-v1"
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Extract the features of an image collection', add_help=False)
    parser.add_argument('--data_path', default='', type=str, help="""Images to embed: an ImageFolder tree, a
        folder of images at any depth, a text file with one image path per line, a packed .npz file or
        "synthetic" (several folders: comma-separated or a glob).""")
    parser.add_argument('--data_layout', default='auto', choices=data.LAYOUTS, help="""How to read --data_path:
        imagefolder (labels from the class folders), unlabeled (every image below the folder, no labels), list
        (a text file of image paths) or auto (data.build_dataset decides from what --data_path holds).""")
    parser.add_argument('--output_dir', default='features', type=str, help="""Where to write features.npy,
        paths.txt, labels.npy, patch_features.npy, skipped.txt and meta.json. Running the same command again
        continues an interrupted extraction there.""")
    backbones.add_model_args(parser)  # eval_knn.py's: the same network, weights and pixels
    parser.add_argument('--seed', default=0, type=int, help="""Seed of the random initialisation when no
        --pretrained_weights are given (a reproducible random baseline).""")
    parser.add_argument('--normalize', default=True, type=utils.bool_flag, help="""L2-normalise every feature
        (the k-NN and retrieval convention); false: the raw output of the network.""")
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float16'), help="""Stored precision
        (float16 halves the files; cosine similarities of normalised features then carry errors of about 1e-3).""")
    parser.add_argument('--patch_tokens', default=False, type=utils.bool_flag, help="""Also write
        patch_features.npy: the mean of the last block's patch tokens (ViTs only).""")
    parser.add_argument('--chunk_size', default=10000, type=int, help="""Images per part file: the memory in
        use, and what an interruption can cost, is one chunk.""")
    parser.add_argument('--print_freq', default=10, type=int, help='Progress line every so many batches.')
    utils.add_distributed_args(parser)
    return parser


# ----------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------
def build_collection(args: argparse.Namespace) -> data.LabeledDataset:
    """--data_path with the evaluation transform, in a fixed order: `(image, target, error)` items; no labels
    (`classes == []`, targets -1) for unlabeled folders and lists."""
    base = data.build_dataset(args.data_path, layout=args.data_layout)
    dataset = data.LabeledDataset(base, data.eval_transform(args.resize_size, args.crop_size))
    if len(dataset) == 0:
        raise UserError(f"--data_path {args.data_path} holds no image")
    return dataset


def feature_forward(model: nn.Module, patch_tokens: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> [B, D] features (eval_knn.py's: model(images), the CLS token of our ViTs), or with
    `patch_tokens` [B, 2D]: the CLS token, then the mean patch token, of one pass."""
    if not patch_tokens:
        return model

    def forward(images: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(images)  # normalised [B, prefix + patches, D]: model(images) is tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=1)
    return forward


# ----------------------------------------------------------------------------------------------------
# What an output folder holds: meta.json
# ----------------------------------------------------------------------------------------------------
def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def paths_digest(dataset: data.LabeledDataset) -> str:
    return hashlib.sha256("\n".join(path for path, _ in dataset.samples).encode("utf-8", "surrogateescape")
                          ).hexdigest()


def extraction_options(args: argparse.Namespace, dataset: data.LabeledDataset) -> Dict[str, Any]:
    """Everything that decides the numbers and the rows of the output: two runs that agree on these may
    share an output folder. The weights are named by their content (a checkpoint.pth rewritten by further
    training is other weights); the images by the digest of their paths in order."""
    weights = args.pretrained_weights
    if weights and os.path.isfile(weights):
        weights_id = "sha256:" + sha256_of_file(weights)
    else:  # random weights (from --seed), or a URL that checkpointing downloads
        weights_id = weights or f"random initialisation, seed {args.seed}"
    return {"data_path": args.data_path, "data_layout": args.data_layout, "num_images": len(dataset),
            "paths_sha256": paths_digest(dataset), "arch": args.arch,
            "patch_size": backbones.patch_size_of(args.arch, args.patch_size), "pretrained_weights": weights,
            "weights": weights_id, "checkpoint_key": args.checkpoint_key,
            "resize_size": args.resize_size, "crop_size": args.crop_size, "normalize": args.normalize,
            "dtype": args.dtype, "patch_tokens": args.patch_tokens, "chunk_size": args.chunk_size}


def write_meta(output_dir: str, meta: Dict[str, Any]) -> None:
    checkpointing.atomic_write(os.path.join(output_dir, "meta.json"), lambda f: json.dump(meta, f, indent=1), mode="w")


def read_meta(output_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(output_dir, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable ({type(e).__name__}: {e}): remove it, or choose another "
                        "--output_dir") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} was not written by extract_features.py: choose another --output_dir")
    return meta


def option_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


OUTPUT_FILES = ("features.npy", "paths.txt", "labels.npy", "patch_features.npy", "skipped.txt")


def prepare_output_dir(output_dir: str, options: Dict[str, Any], num_chunks: int) -> Optional[List[int]]:
    """(Rank 0.) The chunks still to extract, or None when the folder holds this very extraction, finished.
    Refuses a folder that holds another extraction, or extraction files without their meta.json."""
    runtime.check_output_dir(output_dir)
    meta = read_meta(output_dir)
    if meta is not None and meta.get("options") != options:
        if meta.get("complete") or parts_on_disk(output_dir):
            differences = option_differences(meta.get("options") or {}, options)
            raise UserError(f"--output_dir {output_dir} holds another extraction ({'; '.join(differences[:4])}): "
                            "choose another --output_dir, or remove that one to start again")
        meta = None  # that extraction stopped before its first chunk: there is nothing to mix, start afresh
    if meta is None:
        found = [n for n in OUTPUT_FILES if os.path.exists(os.path.join(output_dir, n))] + parts_on_disk(output_dir)
        if found:
            raise UserError(f"--output_dir {output_dir} holds {', '.join(found[:3])} but no meta.json, so nothing "
                            "says what they are: choose another --output_dir, or remove them")
        write_meta(output_dir, {"format": FORMAT, "complete": False, "options": options})
    elif meta.get("complete"):
        missing = [n for n in meta.get("files", []) if not os.path.isfile(os.path.join(output_dir, n))]
        if missing:
            raise UserError(f"the finished extraction in {output_dir} lacks {', '.join(missing)}: remove the "
                            "folder and extract again")
        shutil.rmtree(parts_dir(output_dir), ignore_errors=True)  # if a kill came just before their removal
        return None
    os.makedirs(parts_dir(output_dir), exist_ok=True)
    checkpointing.remove_stale_temporaries(parts_dir(output_dir))  # partial parts of a killed run
    return [c for c in range(num_chunks) if not os.path.isfile(part_path(output_dir, c))]


def parts_on_disk(output_dir: str) -> List[str]:
    folder = parts_dir(output_dir)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join("parts", n) for n in names if n.startswith("chunk_") and n.endswith(".npz")]


def parts_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "parts")


def part_path(output_dir: str, chunk: int) -> str:
    return os.path.join(parts_dir(output_dir), f"chunk_{chunk:05d}.npz")


# ----------------------------------------------------------------------------------------------------
# One chunk
# ----------------------------------------------------------------------------------------------------
def finish(features: torch.Tensor, normalize: bool, dtype: str) -> np.ndarray:
    if normalize:
        features = nn.functional.normalize(features.float(), dim=1, p=2)
    return features.cpu().numpy().astype(dtype)


def extract_chunk(model: nn.Module, forward: Callable, dataset: data.LabeledDataset, start: int, end: int,
                  args: argparse.Namespace, header: str) -> Dict[str, np.ndarray]:
    """The arrays of the part file of images [start, end): every rank reads its share of them
    (backbones.extract_features: rank r reads r, r + W, ...), every rank gets all rows in order; the rows of
    unreadable images are left out, and those images listed with the reason in `skipped`."""
    use_cuda = args.device.type == "cuda"  # the rows are gathered where NCCL can: on the GPU
    loader = data.build_eval_loader(Subset(dataset, range(start, end)), args.batch_size_per_gpu, args.num_workers,
                                    args.rank, args.world_size, pin_memory=use_cuda)
    features, errors = backbones.extract_features(model, loader, args.device, use_cuda, header=header,
                                                  print_freq=args.print_freq, forward=forward)
    keep = backbones.readable_mask(dataset.samples[start:end], errors).to(features.device)
    features = features[keep]
    arrays = {"indices": np.arange(start, end, dtype=np.int64)[keep.cpu().numpy()],
              "skipped": np.array(errors, dtype=str)}
    if args.patch_tokens:  # the CLS token, then the mean patch token (feature_forward)
        width = features.shape[1] // 2
        arrays["patch_features"] = finish(features[:, width:], args.normalize, args.dtype)
        features = features[:, :width]
    arrays["features"] = finish(features, args.normalize, args.dtype)
    return arrays


@contextlib.contextmanager
def stop_on_signals(progress: Callable[[], str]) -> Iterator[None]:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR2 (SLURM's warning) stop at once, with a message and exit code
    128 + signal (runtime.run_script): the chunk in progress is abandoned, the chunks on disk are kept for the next
    run. The handler the signal had before travels with the exception (a SLURM launcher's requeue)."""
    def handler(signum: int, frame) -> None:
        raise utils.TrainingInterrupted(signum, f"Stopped by {signal.Signals(signum).name}: {progress()}. Run "
                                        "the same command again to continue from there.", previous.get(signum))
    previous = {s: signal.signal(s, handler) for s in runtime.StopSignals.SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------
# The final files
# ----------------------------------------------------------------------------------------------------
def concatenate(output_dir: str, name: str, key: str, num_chunks: int, rows: int) -> None:
    """`key` of every part into `name` [rows, D], one part in memory at a time."""
    with np.load(part_path(output_dir, 0)) as z:
        width, dtype = z[key].shape[1], z[key].dtype

    def write(f) -> None:  # the .npy header, then the parts' rows in order
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": (rows, width)})
        for c in range(num_chunks):
            with np.load(part_path(output_dir, c)) as z:
                f.write(np.ascontiguousarray(z[key], dtype=dtype).tobytes())
    checkpointing.atomic_write(os.path.join(output_dir, name), write)


def assemble(output_dir: str, dataset: data.LabeledDataset, num_chunks: int, options: Dict[str, Any]) -> Dict:
    """(Rank 0.) The final files from the parts, in dataset order; then meta.json says complete and the parts
    go. A kill in the middle leaves the parts: the next run assembles again."""
    indices, skipped = [], []
    for c in range(num_chunks):
        with np.load(part_path(output_dir, c)) as z:
            indices.append(z["indices"])
            skipped += [str(s) for s in z["skipped"]]
    indices = np.concatenate(indices)
    files = ["features.npy", "paths.txt", "skipped.txt"]
    concatenate(output_dir, "features.npy", "features", num_chunks, len(indices))
    if options["patch_tokens"]:
        concatenate(output_dir, "patch_features.npy", "patch_features", num_chunks, len(indices))
        files.append("patch_features.npy")
    checkpointing.atomic_write(os.path.join(output_dir, "paths.txt"),
                               lambda f: f.writelines(dataset.samples[i][0] + "\n" for i in indices), mode="w")
    checkpointing.atomic_write(os.path.join(output_dir, "skipped.txt"),
                               lambda f: f.writelines(s + "\n" for s in skipped), mode="w")
    if data.has_labels(dataset):
        labels = np.asarray(dataset.targets, dtype=np.int64)[indices]
        checkpointing.atomic_write(os.path.join(output_dir, "labels.npy"), lambda f: np.save(f, labels))
        files.append("labels.npy")
    features = np.load(os.path.join(output_dir, "features.npy"), mmap_mode="r")
    meta = {"format": FORMAT, "complete": True, "options": options, "count": len(indices),
            "skipped": len(skipped), "dim": features.shape[1], "files": sorted(files),
            "classes": list(dataset.classes)}
    if options["patch_tokens"]:
        meta["patch_dim"] = int(np.load(os.path.join(output_dir, "patch_features.npy"), mmap_mode="r").shape[1])
    del features
    write_meta(output_dir, meta)
    shutil.rmtree(parts_dir(output_dir))
    return meta


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise UserError("give --data_path: the images to embed (a folder, a text file of paths, a packed file)")
    if args.chunk_size < 1 or args.batch_size_per_gpu < 1:
        raise UserError("--chunk_size and --batch_size_per_gpu must be at least 1")
    if args.patch_tokens and not backbones.is_vit(args.arch) and not args.pretrained_weights.endswith(".onnx"):
        raise UserError(f"--patch_tokens true needs one of our ViTs ({backbones.OUR_VITS}); --arch "
                        f"{args.arch} has no patch tokens to average (its global feature is in features.npy)")


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not utils.is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=runtime.cpu_group())
    return holder[0]


def extract_features(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Extract (or continue extracting) into --output_dir; returns meta.json's content (on rank 0)."""
    runtime.init_distributed_mode(args)
    runtime.fix_random_seeds(args.seed)  # random weights: the same on every rank and in every run
    runtime.print_run_info(args)
    check_args(args)
    dataset = build_collection(args)
    bad_paths = [path for path, _ in dataset.samples if "\n" in path]
    if bad_paths:
        raise UserError(f"the image path {bad_paths[0]!r} holds a line break, which paths.txt cannot store")
    runtime.check_same_on_all_ranks({"images": len(dataset), "paths": paths_digest(dataset)}, "the images")
    num_chunks = (len(dataset) + args.chunk_size - 1) // args.chunk_size

    # The model first: weights that do not fit stop here, before anything is written.
    if args.pretrained_weights.endswith(".onnx"):  # an export_backbone.py file, run by onnxruntime on the CPU
        import exporting
        model = exporting.OnnxBackbone(args.pretrained_weights)
        print(f"Model: {args.pretrained_weights}, the ONNX export of {model.meta['arch']} (--arch is not used), run by "
              "onnxruntime on the CPU.")
        args.arch, args.patch_size = model.meta["arch"], model.meta["multiple"]  # what meta.json records
        if args.patch_tokens and not model.vit:
            raise UserError(f"--patch_tokens true needs a ViT; {args.pretrained_weights} is a {model.meta['arch']}")
    else:
        model = backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key,
                                           args.device)
    forward = feature_forward(model, args.patch_tokens)

    # Rank 0 reads the output folder and decides; every rank stops together on its verdict.
    options, todo, error = None, None, None
    if utils.is_main_process():
        try:
            options = extraction_options(args, dataset)
            todo = prepare_output_dir(args.output_dir, options, num_chunks)
        except UserError as e:
            error = str(e)
    runtime.raise_together(error)
    todo = broadcast(todo)
    if todo is None:
        print(f"{args.output_dir} already holds this extraction, complete: nothing to do.")
        return read_meta(args.output_dir) if utils.is_main_process() else None
    print(f"{len(dataset)} images ({'with' if data.has_labels(dataset) else 'without'} labels) in {num_chunks} chunks "
          f"of {args.chunk_size}; {num_chunks - len(todo)} already on disk, {len(todo)} to extract.")

    todo_images = sum(min(args.chunk_size, len(dataset) - c * args.chunk_size) for c in todo)
    images_done, start_time = 0, time.time()

    def progress() -> str:
        return f"{len(parts_on_disk(args.output_dir))} of {num_chunks} chunks are in {parts_dir(args.output_dir)}"
    with stop_on_signals(progress):
        for c in todo:
            start, end = c * args.chunk_size, min((c + 1) * args.chunk_size, len(dataset))
            arrays = extract_chunk(model, forward, dataset, start, end, args, header=f"Chunk {c + 1}/{num_chunks}")
            if utils.is_main_process():
                checkpointing.atomic_write(part_path(args.output_dir, c), lambda f: np.savez(f, **arrays))
            images_done += end - start
            rate = images_done / (time.time() - start_time)
            eta = datetime.timedelta(seconds=int((todo_images - images_done) / rate))
            print(f"Chunk {c + 1}/{num_chunks} written ({len(arrays['indices'])} images, {len(arrays['skipped'])} "
                  f"unreadable): {images_done}/{todo_images} images of this run, {rate:.1f} img/s, eta {eta}",
                  flush=True)

    meta = None
    if utils.is_main_process():
        meta = assemble(args.output_dir, dataset, num_chunks, options)
        print(f"{meta['count']} features of dimension {meta['dim']} written to "
              f"{os.path.join(args.output_dir, 'features.npy')} ({', '.join(meta['files'])}, meta.json).")
        if meta["skipped"]:
            print(f"WARNING: {meta['skipped']} unreadable images left out, listed in "
                  f"{os.path.join(args.output_dir, 'skipped.txt')}")
    return meta


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Extract the features of an image collection', parents=[get_args_parser()])
    runtime.run_script(extract_features, parser.parse_args())
