# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Image collections as lists of files: what a `--data_path` holds, and the image files in it.

A `--data_path` is one or several parts (comma-separated, or a glob), each in one of three layouts; `detect`
(layout "auto") tells them apart, `--data_layout` forces one:

- `imagefolder`: one sub-folder per class, images at any depth below it (torchvision's ImageFolder): labels.
  Auto-detected when the folder has no image directly in it and every sub-folder holds images.
- `unlabeled`: images at any depth, no class structure (any other folder): `classes == []`, targets -1.
- `list`: a text file of image paths, one per line, relative to the file's folder or absolute; blank lines and
  lines starting with `#` are ignored. Any file given as a part is one.

ImageFolder parts merge their classes by name (ImageNet-100's `train.X1,...,train.X4`); any other mix is read
without labels. `read_collection` returns an `ImageFiles`, which reads like a torchvision ImageFolder.

Folders are walked once, in parallel over their top-level sub-folders (on a network file system the time goes
into waiting for each listing, which threads overlap), with hidden files and folders and files without an image
extension left out. Symbolic links are followed, but never into a folder already walked from the same top-level
sub-folder, which ends link loops. With a `cache_dir`, the walk is kept in `file_list_<hash>.json` there; the
next run takes it when no folder walked has changed, checked with one os.stat per folder and no listing. A
folder's modification time changes when entries are added, removed or renamed in it, not when a file in it is
rewritten in place: such changes are not seen (delete the cache file to force a walk).

Imports the standard library, `runtime` and `checkpointing`; `data.build_dataset` is what the scripts call.
"""
import concurrent.futures
import glob
import hashlib
import json
import os
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import checkpointing
from runtime import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
LAYOUTS = ("auto", "imagefolder", "unlabeled", "list")
NO_LABEL = -1  # the target of every image of an unlabeled collection
WALK_THREADS = 8
CACHE_FORMAT = "dino-file-list-v1"
# A folder changed within this long before its listing may change again in the same tick of a coarse file-system
# clock (1-2 s on FAT and some network file systems) without its modification time moving: not trusted.
RACY_NS = 2 * 10 ** 9


def has_labels(dataset) -> bool:
    """Whether `dataset` (a `build_dataset` result, or a dataset wrapping one as `.base`) has class labels."""
    classes = getattr(dataset, "classes", None)
    if classes is None and hasattr(dataset, "base"):
        classes = getattr(dataset.base, "classes", None)
    return bool(classes)


def resolve_roots(data_path: str) -> List[str]:
    """`--data_path` as a list of parts (folders or list files): one path, a comma-separated list, or a glob."""
    roots = []
    for part in [p for p in data_path.split(",") if p.strip()]:
        part = os.path.expanduser(part.strip())
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise UserError(f"--data_path pattern {part!r} matches no folder or file")
        roots += matches
    if not roots:
        raise UserError("--data_path is empty")
    for root in roots:
        if not os.path.exists(root):
            raise UserError(f"--data_path {root} does not exist: give a folder of images (at any depth; one "
                            "sub-folder per class for labels), a text file listing image paths, a packed .npz "
                            "file, or 'synthetic' for generated data")
    return roots


# ----------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------
class ImageFiles:
    """Image files as torchvision's ImageFolder has them: `samples` ((path, target) pairs), `targets`, `classes`,
    `class_to_idx`, `loader(path)`; an item is `(image, target)`, through `transform` when one is set. Without
    labels, `classes == []` and every target is -1. `description`: what was found, as printed."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], loader: Callable, root: str,
                 layout: str, description: str, transform: Optional[Callable] = None):
        self.samples = samples
        self.imgs = samples  # torchvision's other name for them
        self.targets = [target for _, target in samples]
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.loader = loader
        self.root, self.layout, self.description = root, layout, description
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), target

    def __repr__(self) -> str:
        return f"ImageFiles({self.description}: {self.root})"


# ----------------------------------------------------------------------------------------------------
# Walking folders
# ----------------------------------------------------------------------------------------------------
class Folder(NamedTuple):
    """One folder walked: its path below the root ('' for the root itself, '/'-separated), its identity on
    disk, its modification time, and the names of its image files (sorted)."""
    rel: str
    dev: int
    ino: int
    mtime_ns: int
    images: List[str]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _scan(path: str) -> Tuple[List[str], List[str]]:
    """(image file names, sub-folder names) of one folder, each sorted, hidden entries left out."""
    images, folders = [], []
    with os.scandir(path) as entries:
        for entry in entries:  # the hot loop of a walk (once per file): no function calls of our own in it
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symbolic links; from the listing itself for anything else
            except OSError:  # a link onto itself (ELOOP), or one we may not follow: not a folder we can walk
                is_dir = False
            if is_dir:
                folders.append(name)
            elif name.lower().endswith(IMG_EXTENSIONS):
                images.append(name)
    return sorted(images), sorted(folders)


def _prefix(root: str, rel: str) -> str:
    """The folder root/rel ending in '/': prefix + name is os.path.join(folder, name), string for string (the
    paths of torchvision's make_dataset), at a fraction of its cost for a million files."""
    folder = os.path.join(root, rel) if rel else root
    return folder if folder.endswith("/") else folder + "/"


def _walk(root: str, top: str, seen: Set[Tuple[int, int]], errors: List[str]) -> List[Folder]:
    """Every folder under root/top, top included, depth first in name order, skipping the folders in `seen`
    ((st_dev, st_ino) pairs, added to as it goes): a link loop is followed once at most."""
    folders = []
    stack = [top]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            images, subfolders = _scan(path)
        except OSError as e:  # vanished, or not ours to read: reported, and the file list is then not cached
            errors.append(f"{path}: {e.strerror or e}")
            continue
        folders.append(Folder(rel, st.st_dev, st.st_ino, st.st_mtime_ns, images))
        stack.extend(f"{rel}/{name}" for name in reversed(subfolders))
    return folders


def _map(fn: Callable, items: Sequence, threads: int) -> list:
    """[fn(x) for x in items], on up to `threads` threads (which overlap the waits of os.scandir and os.stat)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def walk_folder(root: str, cache_dir: Optional[str] = None, threads: int = WALK_THREADS) -> Tuple[List[Folder], str]:
    """Every folder under `root` (the root first, then each top-level sub-folder's tree in name order) and how
    the list was had ("listed in 1.2 s", or the cache file it came from). Top-level sub-folders are walked
    each on its own (an ImageFolder's class may link to another's images, as in torchvision) and in parallel."""
    cache_path = None
    if cache_dir:
        key = json.dumps([CACHE_FORMAT, os.path.realpath(root), IMG_EXTENSIONS])
        cache_path = os.path.join(cache_dir, f"file_list_{hashlib.sha1(key.encode()).hexdigest()[:16]}.json")
        folders = _load_cache(cache_path, root, threads)
        if folders is not None:
            return folders, f"file list from {cache_path}"
    start_ns = time.time_ns()
    errors: List[str] = []
    try:
        st = os.stat(root)
        images, subfolders = _scan(root)
    except OSError as e:
        raise UserError(f"--data_path {root}: cannot list it ({e.strerror or e}): check its permissions") from None
    top_key = (st.st_dev, st.st_ino)  # never walked again: a link back up to the root is a loop
    walks = _map(lambda name: _walk(root, name, {top_key}, errors), subfolders, threads)
    folders = [Folder("", st.st_dev, st.st_ino, st.st_mtime_ns, images)] + [f for walk in walks for f in walk]
    if errors:
        print(f"WARNING: {len(errors)} folder(s) under {root} could not be read and are left out (the first: "
              f"{errors[0]}); the file list is not cached")
    elif cache_path:
        _save_cache(cache_path, root, start_ns, folders)
    return folders, f"listed in {(time.time_ns() - start_ns) / 1e9:.1f} s"


def _save_cache(path: str, root: str, walked_at_ns: int, folders: List[Folder]) -> None:
    """Write the walk atomically: a reader sees the old file or the new one."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        checkpointing.atomic_write(path, lambda f: json.dump(
            {"format": CACHE_FORMAT, "root": os.path.realpath(root), "walked_at_ns": walked_at_ns,
             "folders": folders}, f, separators=(",", ":")), mode="w", what="file list cache")
    except (OSError, UserError) as e:  # a cache is an optimisation: a read-only output folder must not stop the run
        reason = e.__context__ if isinstance(e, UserError) and e.__context__ is not None else e  # the OSError
        print(f"WARNING: could not write the file list cache {path} ({getattr(reason, 'strerror', None) or reason}); "
              "the next run walks again")


def _load_cache(path: str, root: str, threads: int) -> Optional[List[Folder]]:
    """The cached walk of `root` if no folder in it changed since, else None (also for a missing or bad file)."""
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["format"] != CACHE_FORMAT or cached["root"] != os.path.realpath(root):
            return None
        folders = [Folder(*row) for row in cached["folders"]]
        trusted_before = int(cached["walked_at_ns"]) - RACY_NS
    except (OSError, ValueError, TypeError, KeyError):
        return None

    def unchanged(folder: Folder) -> bool:
        if folder.mtime_ns >= trusted_before:
            return False
        try:
            return os.stat(os.path.join(root, folder.rel) if folder.rel else root).st_mtime_ns == folder.mtime_ns
        except OSError:
            return False
    return folders if all(_map(unchanged, folders, threads)) else None


# ----------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------
class Part(NamedTuple):
    """One part of a `--data_path`, read: its layout, its images ((path, class name or '') in order), its
    classes, and what was found (`summary`, then `notes`)."""
    path: str
    layout: str
    images: List[Tuple[str, str]]
    classes: List[str]
    summary: str
    notes: List[str]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith('s') else 's'}"


def _no_image_error(path: str, where: str) -> UserError:
    return UserError(f"--data_path {path}: no image found {where} (looked for {' '.join(IMG_EXTENSIONS)}, in any "
                     "case; hidden files and folders are skipped)")


def read_folder(root: str, layout: str = "auto", cache_dir: Optional[str] = None,
                threads: int = WALK_THREADS) -> Part:
    """A folder as an ImageFolder or as unlabeled images; `layout` "auto" decides (see the module docstring)."""
    folders, how = walk_folder(root, cache_dir, threads)
    trees: Dict[str, List[Folder]] = {}  # top-level sub-folder -> its folders
    for folder in folders[1:]:
        trees.setdefault(folder.rel.split("/", 1)[0], []).append(folder)
    counts = {name: sum(len(f.images) for f in tree) for name, tree in trees.items()}
    empty = [name for name, n in counts.items() if n == 0]
    top_images = folders[0].images
    if layout == "auto":
        layout = "imagefolder" if counts and not empty and not top_images else "unlabeled"
    notes = []
    if layout == "imagefolder":
        if not counts:
            raise UserError(f"--data_path {root}: no class folders found, so it is not an ImageFolder (one "
                            "sub-folder of images per class): read its images without labels with --data_layout "
                            "unlabeled (or auto)")
        if empty:
            raise UserError(f"--data_path {root}: no image in the class folder(s) "
                            f"{', '.join(os.path.join(root, c) for c in empty)}. Each class folder must hold at least "
                            f"one image ({', '.join(IMG_EXTENSIONS)}), or read the folder without labels with "
                            "--data_layout unlabeled (or auto)")
        classes = sorted(counts)
        # torchvision's make_dataset order: class by class, folders by path, files by name
        images = [(prefix + name, c) for c in classes for f in sorted(trees[c], key=lambda f: f.rel)
                  for prefix in [_prefix(root, f.rel)] for name in f.images]
        summary = f"ImageFolder: {_count(len(classes), 'class')}, {len(images):,} images"
        if top_images:
            notes.append(f"{_count(len(top_images), 'image')} directly in it not used")
        if {"train", "val"} <= set(classes):
            notes.append("its classes include train and val: did you mean one of them?")
        return Part(root, layout, images, classes, summary, notes + [how])
    # Unlabeled: a folder reached from two top-level sub-folders (through a link) counts once, where first walked.
    seen, kept = set(), []
    for folder in folders:
        if (folder.dev, folder.ino) not in seen:
            seen.add((folder.dev, folder.ino))
            kept.append(folder)
    kept.sort(key=lambda f: f.rel)  # sorted paths: the root's own images first
    images = [(prefix + name, "") for f in kept for prefix in [_prefix(root, f.rel)] for name in f.images]
    if not images:
        raise _no_image_error(root, "in it or in its sub-folders")
    holding = sum(1 for f in kept if f.images)
    summary = f"unlabeled: {len(images):,} images under {_count(holding, 'folder')}"
    if empty and counts and len(empty) < len(counts):  # may have been meant as an ImageFolder
        notes.append(f"not an ImageFolder: no image in its sub-folder(s) {', '.join(empty[:3])}"
                     f"{', ...' if len(empty) > 3 else ''}")
    return Part(root, "unlabeled", images, [], summary, notes + [how])


def read_list(path: str) -> Part:
    """A text file of image paths, one per line (relative to its folder, or absolute), in file order."""
    if is_image_file(path):
        raise UserError(f"--data_path {path} is an image, not a list of images: give its folder, or a text file "
                        "listing image paths")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--data_path {path} is a file but not a text file: give a folder of images, or a text "
                        "file listing image paths, one per line") from None
    except OSError as e:
        raise UserError(f"--data_path {path}: cannot read it ({e.strerror or e})") from None
    folder = os.path.dirname(path)
    images = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            images.append((os.path.join(folder, os.path.expanduser(line)), ""))
    if not images:
        raise UserError(f"--data_path {path}: the list names no image (one path per line; blank lines and lines "
                        "starting with # are ignored)")
    # One check, not one per file (a million stats on a network file system): a list written for another
    # folder fails on its first line. Other missing files are reported as unreadable while training.
    if not os.path.exists(images[0][0]):
        raise UserError(f"--data_path {path}: its first image {images[0][0]} does not exist (relative paths are "
                        f"taken from the list file's folder, {os.path.abspath(folder)})")
    return Part(path, "list", images, [], f"list: {len(images):,} images", [])


def read_collection(roots: Sequence[str], loader: Callable, layout: str = "auto", cache_dir: Optional[str] = None,
                    threads: int = WALK_THREADS, verbose: bool = True) -> ImageFiles:
    """The images of `roots` (folders and list files, e.g. from `resolve_roots`) as one `ImageFiles`, read with
    `loader`. `layout`: one of LAYOUTS; a file is always a list. Prints one line saying what was found."""
    if layout not in LAYOUTS:
        raise UserError(f"--data_layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    parts = []
    for root in roots:
        if os.path.isdir(root):
            if layout == "list":
                raise UserError(f"--data_path {root} is a folder: --data_layout list takes a text file listing "
                                "image paths, one per line (or use --data_layout auto)")
            parts.append(read_folder(root, layout, cache_dir, threads))
        elif layout in ("imagefolder", "unlabeled"):
            raise UserError(f"--data_path {root} is a file: --data_layout {layout} takes folders (a file is read as "
                            "a list of image paths, with --data_layout list or auto)")
        else:
            parts.append(read_list(root))
    if all(p.layout == "imagefolder" for p in parts):
        classes = sorted(set().union(*(p.classes for p in parts)))  # the same index for a class in every root
        index = {c: i for i, c in enumerate(classes)}
        samples = [(path, index[c]) for p in parts for path, c in p.images]
        kind, summary = "imagefolder", f"ImageFolder: {_count(len(classes), 'class')}, {len(samples):,} images"
    else:
        classes = []
        samples = [(path, NO_LABEL) for p in parts for path, _ in p.images]
        kind, summary = (parts[0].layout if len(parts) == 1 else "mixed"), f"unlabeled: {len(samples):,} images"
    if len(parts) == 1:
        description = f"{parts[0].summary} ({'; '.join([parts[0].path] + parts[0].notes)})"
    else:
        unused = ", labels not used" if kind != "imagefolder" and any(p.classes for p in parts) else ""
        description = f"{summary} from {len(parts)} parts{unused}: " + ", ".join(
            f"{p.path} ({'; '.join([p.summary] + p.notes)})" for p in parts)
    if verbose:
        print(f"Data: {description}")
    return ImageFiles(samples, classes, loader, ",".join(roots), kind, description)
