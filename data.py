# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Data for self-supervised pretraining and evaluation: decoding, datasets, seeded sampling and loading.

The augmentation itself is in `augmentations.py` (`DataAugmentationDINO`) and the iBOT masks in `masking.py`
(`MaskedCrops`); this module reads the images and runs them through a transform.

- `pil_loader_rgb`: any image file decoded to 8-bit RGB.
- `build_dataset(data_path, layout=, cache_dir=)`: any image collection: an ImageFolder tree, an unlabeled folder,
  a list file, several merged (e.g. ImageNet-100's `train.X1,...,train.X4`; walking and detection in `layouts.py`),
  a packed file (`PackedImages`), or `synthetic`: the generated dataset of `synthetic.py`, cached on disk.
- `PretrainDataset` + `EpochSampler`: every sample's augmentation is seeded from (seed, epoch, index),
  so a run is reproducible whatever the number of workers or ranks, and a resumed run sees exactly the
  augmentations of an uninterrupted one. Unreadable images are replaced by another sample and reported.
- `build_loader(...)`: the DataLoader with all of that wired in.
- `eval_transform`, `LabeledDataset`, `build_eval_loader`: labelled images, for k-NN and linear evaluation
  and the linear probe's training (dataset order kept, unreadable images flagged rather than replaced).
"""
import contextlib
import itertools
import os
import random
import signal
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import augmentations
import checkpointing
import layouts
import runtime
import synthetic
from layouts import LAYOUTS, has_labels, resolve_roots  # noqa: F401  (for callers: data.LAYOUTS, ...)
from runtime import UserError, print_all_ranks

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
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB (pil_loader_rgb's conversion)."""
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
def build_dataset(data_path: str, split: str = "train", layout: str = "auto", cache_dir: Optional[str] = None):
    """The images of `--data_path`, ImageFolder-style (`.samples`, `.targets`, `.classes`, `.loader`; no transform).

    `synthetic` (optionally `synthetic:/cache/dir`) generates, or reuses, the shapes dataset and returns its
    `split`; a packed file (`*.npz`, see `PackedImages`) gives its `split`. Anything else, folders and list files,
    one or several (comma-separated or a glob, `resolve_roots`), is read by `layouts.read_collection`: `layout`
    "auto" detects ImageFolder trees, unlabeled folders (targets -1, no classes: see `has_labels`) and lists, or
    forces one of "imagefolder", "unlabeled", "list". `cache_dir` (the run's output folder): where the walk of
    the folders is kept for the next run (`file_list_<hash>.json`); None: no cache.
    """
    if is_packed(data_path):
        return PackedImages(data_path, split)
    if data_path == "synthetic" or data_path.startswith("synthetic:"):
        cache = data_path.split(":", 1)[1] if ":" in data_path else None
        root = synthetic.make_synthetic_dataset(cache) if cache else synthetic.make_synthetic_dataset()
        return layouts.read_collection([os.path.join(root, split)], pil_loader_rgb, "imagefolder", cache_dir)
    return layouts.read_collection(resolve_roots(data_path), pil_loader_rgb, layout, cache_dir)


# ----------------------------------------------------------------------------------------------------
# Packed image collections: one file instead of thousands of small ones
# ----------------------------------------------------------------------------------------------------
PACKED_FORMAT = "dino-packed-images-v1"


def is_packed(data_path: str) -> bool:
    """Whether `--data_path` names a packed file (`*.npz`) rather than folders."""
    return isinstance(data_path, str) and data_path.lower().endswith(".npz")


def _split_jpeg(blob: bytes) -> Tuple[bytes, bytes]:
    """(header, rest) of a JPEG file: the header runs to the end of the first start-of-scan segment, and is
    the same for every image that one encoder wrote with one quality and size (quantisation and Huffman
    tables, frame size), e.g. 623 of CIFAR-10's 888 bytes per image. (b"", blob) for anything else."""
    if blob[:2] != b"\xff\xd8":
        return b"", blob
    i = 2
    while i + 4 <= len(blob) and blob[i] == 0xFF:
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = blob[i + 2] << 8 | blob[i + 3]
        if marker == 0xDA:  # start of scan: the entropy-coded data follows its header
            return blob[:i + 2 + length], blob[i + 2 + length:]
        i += 2 + length
    return b"", blob


def _joined(strings: Sequence[str]) -> np.ndarray:
    return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8)


def _split_strings(array: np.ndarray) -> List[str]:
    text = array.tobytes().decode("utf-8")
    return text.split("\n") if text else []


def pack_image_folders(splits: Dict[str, str], out_path: str, per_class: Optional[int] = None) -> Dict[str, int]:
    """Write the image files of ImageFolder trees, one per split name (e.g. {"train": ".../train", "test":
    ".../test"}), into one `.npz` file that `PackedImages` reads (and `--data_path` accepts).

    The files' bytes are stored unchanged, so that the pixels are exactly those of the folders; a JPEG
    header that many files share (the same encoder, quality and size) is stored once. CIFAR-10 (60,000
    JPEGs, 57 MB as files) packs into about 16 MB. `per_class`: only the first so many files of each class
    folder (small test sets). Written atomically. Returns the number of images per split."""
    arrays: Dict[str, np.ndarray] = {"format": np.array(PACKED_FORMAT)}
    headers: Dict[bytes, int] = {b"": 0}
    classes = None
    counts = {}
    for split, root in splits.items():
        if "\n" in split or not split.isidentifier():
            raise ValueError(f"split names must be identifiers, got {split!r}")
        folder = layouts.read_collection([root], pil_loader_rgb, "imagefolder", verbose=False)
        if classes is None:
            classes = folder.classes
        elif folder.classes != classes:
            raise UserError(f"{root} does not have the class folders of {next(iter(splits.values()))}")
        samples, taken = [], {}
        for path, label in folder.samples:
            if per_class is None or taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                samples.append((path, label))
        payloads, header_ids = [], np.empty(len(samples), dtype=np.int32)
        for i, (path, _) in enumerate(samples):
            with open(path, "rb") as f:
                header, rest = _split_jpeg(f.read())
            header_ids[i] = headers.setdefault(header, len(headers))
            payloads.append(rest)
        arrays[f"{split}_data"] = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in payloads])]).astype(np.int64)
        arrays[f"{split}_header"] = header_ids
        arrays[f"{split}_labels"] = np.array([label for _, label in samples], dtype=np.int64)
        arrays[f"{split}_names"] = _joined([os.path.relpath(path, root) for path, _ in samples])
        counts[split] = len(samples)
    header_list = sorted(headers, key=headers.get)
    arrays["headers"] = np.frombuffer(b"".join(header_list), dtype=np.uint8)
    arrays["header_offsets"] = np.concatenate([[0], np.cumsum([len(h) for h in header_list])]).astype(np.int64)
    arrays["classes"] = _joined(classes or [])
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # not compressed: JPEG data does not compress
    checkpointing.atomic_write(out_path, lambda f: np.savez(f, **arrays), what="packed file")
    return counts


class PackedImages(Dataset):
    """One split of a packed file (`pack_image_folders`, e.g. `benchmarks/pack_cifar10.py`), as an ImageFolder:
    items are `(PIL RGB image, label)` (through `transform` when given), with `samples` (`(name, label)`
    pairs, the name being `file.npz:split/class/image.jpg`), `targets`, `classes`, `class_to_idx` and
    `loader(name)`, so that `PretrainDataset`, `LabeledDataset` and the scripts' `--data_path` take it.

    The whole file is read into memory once (CIFAR-10: 16 MB), and data-loader workers share it; each item is
    decoded when read, as from the folders, to exactly the same pixels. `split` "val" falls back to "test"
    when the file has no "val" (the k-NN and linear evaluations read train and val)."""

    def __init__(self, path: str, split: str = "train", transform: Optional[Callable] = None):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise UserError(f"--data_path {path}: no such packed file (make one with benchmarks/pack_cifar10.py, "
                            "or give an image folder)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != PACKED_FORMAT:
                    raise UserError(f"--data_path {path} is not a packed image file of this project (no "
                                    f"'{PACKED_FORMAT}' format tag): make it with benchmarks/pack_cifar10.py")
                available = sorted(k[:-len("_offsets")] for k in z.files if k.endswith("_offsets")
                                   and k != "header_offsets")
                if split not in available and split == "val" and "test" in available:
                    split = "test"
                if split not in available:
                    raise UserError(f"--data_path {path} has no split {split!r} (it has: {', '.join(available)})")
                self._data = z[f"{split}_data"]
                self._offsets = z[f"{split}_offsets"]
                self._header_ids = z[f"{split}_header"]
                labels = z[f"{split}_labels"]
                names = _split_strings(z[f"{split}_names"])
                headers, header_offsets = z["headers"].tobytes(), z["header_offsets"]
                self.classes = _split_strings(z["classes"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--data_path {path} is not a readable packed file ({type(e).__name__}: {e})") from None
        self._headers = [headers[a:b] for a, b in zip(header_offsets[:-1], header_offsets[1:])]
        self.root, self.split, self.transform = path, split, transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f"{path}:{split}/{name}", int(label)) for name, label in zip(names, labels)]
        self.targets = [label for _, label in self.samples]
        self._index = {name: i for i, (name, _) in enumerate(self.samples)}
        if len(self.samples) == 0:
            raise UserError(f"--data_path {path}: its {split} split holds no image")

    def __len__(self) -> int:
        return len(self.samples)

    def image_bytes(self, index: int) -> bytes:
        """The image file's bytes, exactly as packed."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._headers[self._header_ids[index]] + self._data[start:end].tobytes()

    def loader(self, name: str) -> Image.Image:
        import io
        img = Image.open(io.BytesIO(self.image_bytes(self._index[name])))
        img.load()
        return to_rgb(img)

    def __getitem__(self, index: int):
        name, label = self.samples[index]
        img = self.loader(name)
        return (self.transform(img) if self.transform is not None else img), label


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
        transforms.Normalize(augmentations.IMAGENET_DEFAULT_MEAN, augmentations.IMAGENET_DEFAULT_STD),
    ])


class SeededItems(Dataset):
    """Items `self._item(index)` (the subclass's) of `self.samples`, keyed by an index or by an EpochSampler's `(epoch, index)`:
    with a `self.seed`, the latter runs `_item` under the per-sample seed of (seed, epoch, index), so that random
    transforms are the same whatever the workers and wherever an epoch is resumed."""

    samples: Sequence
    seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if self.seed is None or epoch is None:
            return self._item(index)
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            return self._item(index)



class LabeledDataset(SeededItems):
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

    def _item(self, index: int):
        path, target = self.samples[index]
        try:
            return self.transform(self.loader(path)), target, ""
        except Exception as e:
            if self._blank is None:
                self._blank = torch.zeros_like(self.transform(Image.new("RGB", (512, 512))))
            return self._blank, target, f"{path}: {type(e).__name__}: {' '.join(str(e).split())}"


def labeled_splits(data_path: str, resize_size: int, crop_size: int,
                   cache_dir: Optional[str] = None) -> Tuple[LabeledDataset, LabeledDataset]:
    """The `train` and `val` splits of `data_path` with the evaluation transform: folders `train/` and `val/`,
    `synthetic`, or a packed file's `train` and `val` (else `test`) splits. `cache_dir`: as in build_dataset."""
    transform = eval_transform(resize_size, crop_size)
    if data_path == "synthetic" or data_path.startswith("synthetic:") or is_packed(data_path):
        bases = [build_dataset(data_path, split) for split in ("train", "val")]  # a packed val: its test split
    else:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(data_path, split)):
                raise UserError(f"--data_path {data_path} has no {split}/ folder: give a folder with train/ "
                                      "and val/ ImageFolder trees")
        bases = [build_dataset(os.path.join(data_path, split), cache_dir=cache_dir) for split in ("train", "val")]
    for split, base in zip(("train", "val"), bases):
        if not has_labels(base):
            found = getattr(base, "description", "no classes")
            raise UserError(f"--data_path {data_path}: its {split} images have no labels ({found}). k-NN and linear "
                            "evaluation need labels: train/ and val/ ImageFolder trees (one sub-folder of images per "
                            "class). Without labels, watch the label-free health signals in log.txt: "
                            "teacher_entropy, kl, rankme")
    if bases[0].classes != bases[1].classes:
        raise UserError(f"train/ and val/ of {data_path} do not have the same class folders "
                              f"({len(bases[0].classes)} vs {len(bases[1].classes)})")
    return LabeledDataset(bases[0], transform), LabeledDataset(bases[1], transform)


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                      shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                      pin_memory: bool = False, epoch_sampler: bool = False) -> DataLoader:
    """DataLoader for evaluation: each of `world_size` ranks reads its share (DistributedSampler; without
    shuffling, rank r reads indices r, r + world_size, ..., and the last indices are repeated to even the
    shares). Call `loader.sampler.set_epoch(epoch)` when shuffling.

    `epoch_sampler` (training on the images, e.g. the linear probe): an EpochSampler instead, whose `(epoch,
    index)` keys seed a seeded LabeledDataset's augmentations per sample and whose `set_epoch(epoch, start)`
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
    """Reports each unreadable image once, counts them, and stops the run above a fraction of the dataset.

    `agree(reports)`, the training loop's call for every batch on every rank, records this rank's reports and
    stops every rank together when any is over the limit (runtime.raise_together), so that a rank over the limit
    does not leave the others waiting. `state_dict()` goes into a mid-epoch checkpoint."""

    def __init__(self, dataset_size: int, max_fraction: float):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.seen: Dict[str, str] = {}

    def update(self, reports: Sequence[str]) -> None:
        """Record `reports` ("path: reason" lines; "" for a readable image), naming each new image once."""
        for report in reports:
            for line in report.splitlines():
                path, _, error = line.partition(": ")
                if path not in self.seen:
                    self.seen[path] = error
                    print_all_ranks(f"WARNING: skipped unreadable image {path} ({error}); replaced by "
                                    "another sample")

    def agree(self, reports: Sequence[str]) -> None:
        """Record this rank's `reports`, then stop on every rank when any rank is over the limit (collective)."""
        if any(reports):
            self.update(reports)
        runtime.raise_together(self.error())

    def error(self) -> Optional[str]:
        """The message that stops the run when more than the allowed fraction is unreadable, else None."""
        if len(self.seen) > self.max_fraction * self.dataset_size:
            return (f"{len(self.seen)} unreadable images out of {self.dataset_size} (more than "
                    f"--max_bad_images_fraction {self.max_fraction}); the first: "
                    f"{next(iter(self.seen))}. Fix or remove them, or raise --max_bad_images_fraction")
        return None

    @property
    def count(self) -> int:
        return len(self.seen)

    def state_dict(self) -> Dict[str, str]:
        return dict(self.seen)

    def load_state_dict(self, state: Dict[str, str]) -> None:
        self.seen.update(state)


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
                 shuffle: bool = True, low_priority_workers: bool = False,
                 collate_fn: Optional[Callable] = None) -> DataLoader:
    """DataLoader over `dataset` (a PretrainDataset) with an EpochSampler; call
    `loader.sampler.set_epoch(epoch)` before each epoch. `low_priority_workers` (for training on CPU)
    runs the workers at the lowest scheduling priority. `collate_fn`: the default collate when None."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, worker_init_fn=_seed_low_priority_worker if low_priority_workers else _seed_worker,
        # Its own generator: creating iterators must not consume the training RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn, persistent_workers=num_workers > 0,
        # 2 batches queued per worker (PyTorch's default): a queue only absorbs jitter, and every queued batch of
        # float32 crops costs memory (pinned memory too on GPU).
        prefetch_factor=2 if num_workers > 0 else None,
    )
