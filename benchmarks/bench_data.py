# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Benchmark of the DINO data pipeline: decode + multi-crop augmentation, ours (`data.py` +
`augmentations.py`) against the official code (`tests/official_dino.py`: ImageFolder's PIL loader + the
official DataAugmentationDINO).

Prints figures; asserts nothing.

    python benchmarks/bench_data.py                                    # imagenette, 2 x 224 + 8 x 96
    python benchmarks/bench_data.py --data_path /path/to/imagenet/train --num_images 300 --num_workers 8
    python benchmarks/bench_data.py --skip_loader --repeats 9           # one-thread figures only

1. One thread (`torch.set_num_threads(1)`; PIL works on one thread): images/s of decode + augmentation over
   the same `--num_images` files for both implementations, alternating which runs first, `--repeats` times;
   each image under the per-sample seed of the training loader (`data.seeded_rng`), so both draw the same
   crop parameters. Wall-clock images/s and images per CPU-second of the process (less sensitive to other
   jobs on the machine); the median per implementation, their ratio and the ratio of each repeat.
2. Profile: the time share of each step (decode, crop + resize, colour jitter, grayscale, blur, solarize,
   to-tensor + normalisation), for each crop kind, measured by wrapping the official transforms and the
   functions of `augmentations.py` with timers (one pass over the images, outside the throughput runs).
3. DataLoader: images/s with `--num_workers` workers, ours (`data.PretrainDataset` + `data.build_loader`:
   persistent workers, prefetch factor 2) and official (torchvision ImageFolder + a plain DataLoader, as
   main_dino.py), after the first batch (worker start-up reported apart), alternating, `--loader_repeats`.

The machine is often shared: the load average before and after each part is printed, and both
implementations always run interleaved under the same conditions.
"""
import argparse
import collections
import datetime
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import augmentations  # noqa: E402
import data  # noqa: E402
from bench_train import cpu_model, git_sha, load_official, loadavg  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the DINO data pipeline (ours vs the official code).")
    p.add_argument("--data_path", default=os.path.join(REPO_ROOT, "..", "shared", "data", "imagenette", "train"),
                   help="image folder (ImageFolder layout)")
    p.add_argument("--num_images", default=150, type=int, help="images per one-thread run (evenly spaced)")
    p.add_argument("--repeats", default=5, type=int, help="one-thread runs per implementation, alternating")
    p.add_argument("--global_crops_scale", default=(0.4, 1.), type=float, nargs=2)
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2)
    p.add_argument("--local_crops_number", default=8, type=int)
    p.add_argument("--global_crops_size", default=224, type=int)
    p.add_argument("--local_crops_size", default=96, type=int)
    p.add_argument("--num_workers", default=2, type=int, help="DataLoader workers (0: no loader benchmark)")
    p.add_argument("--batch_size", default=32, type=int, help="DataLoader batch size")
    p.add_argument("--loader_batches", default=12, type=int, help="timed batches per DataLoader run")
    p.add_argument("--loader_repeats", default=2, type=int)
    p.add_argument("--skip_profile", action="store_true")
    p.add_argument("--skip_loader", action="store_true")
    p.add_argument("--seed", default=0, type=int)
    return p


def pick_files(data_path: str, n: int):
    base = data.build_dataset(data_path)
    step = max(1, len(base.samples) // n)
    return base, [path for path, _ in base.samples[::step][:n]]


class Pipeline:
    """decode + augmentation of one implementation."""

    def __init__(self, name, loader, transform):
        self.name, self.loader, self.transform = name, loader, transform

    def run(self, files, seed: int):
        for index, path in enumerate(files):
            with data.seeded_rng(data.sample_seed(seed, 0, index)):
                self.transform(self.loader(path))


def build_pipelines(args, official):
    return [Pipeline("official", official.pil_loader, build_augmentation(official, args)),
            Pipeline("ours", data.pil_loader_rgb, build_augmentation(augmentations, args))]


# ----------------------------------------------------------------------------------------------------
# 1. One-thread throughput
# ----------------------------------------------------------------------------------------------------
def one_thread(args, pipelines, files):
    """{name: [(wall images/s, images per CPU-second)]} over the repeats, alternating which runs first."""
    results = collections.defaultdict(list)
    for p in pipelines:  # warm-up (imports, allocator, file cache)
        p.run(files[:5], args.seed)
    for r in range(args.repeats):
        for p in (pipelines if r % 2 == 0 else pipelines[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            p.run(files, args.seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            results[p.name].append((len(files) / wall, len(files) / cpu))
    return results


def print_one_thread(results):
    for k, what in ((0, "wall clock, images/s"), (1, "CPU time of the process, images per CPU-second")):
        print(f"   {what}:")
        rates = {name: [x[k] for x in rs] for name, rs in results.items()}
        for name in ("official", "ours"):
            r = rates[name]
            print(f"     {name:9s} median {statistics.median(r):7.1f}   min {min(r):7.1f}   max {max(r):7.1f}   "
                  f"runs: {' '.join(f'{x:.1f}' for x in r)}")
        ratios = [o / f for o, f in zip(rates["ours"], rates["official"])]
        print(f"     ours / official: {statistics.median(rates['ours']) / statistics.median(rates['official']):.2f}x "
              f"(ratio of the medians); per-run ratios {' '.join(f'{x:.2f}' for x in ratios)}")


# ----------------------------------------------------------------------------------------------------
# 2. Profile
# ----------------------------------------------------------------------------------------------------
class Timers:
    """Accumulated CPU time per step; `label(args)` names the crop kind a call belongs to."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.kind = ""  # the crop kind being processed (official pipeline)

    def wrap(self, fn, name, label=None):
        timers = self

        def timed(*a, **k):
            kind = label(a) if label else timers.kind
            key = f"{name} ({kind})" if kind else name
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                timers.total[key] += time.process_time() - t0
        return timed

    def crop_kind(self, fn, kind):
        timers = self

        def labelled(img):
            timers.kind = kind
            try:
                return fn(img)
            finally:
                timers.kind = ""
        return labelled


STEP_NAMES = {"RandomResizedCrop": "crop + resize", "RandomHorizontalFlip": "flip",
              "RandomApply": "colour jitter", "RandomGrayscale": "grayscale", "GaussianBlur": "blur",
              "Solarization": "solarize", "ToTensor": "to-tensor + normalise", "Normalize": "to-tensor + normalise"}


def build_augmentation(module, args):
    return module.DataAugmentationDINO(tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                       args.local_crops_number, global_crops_size=args.global_crops_size,
                                       local_crops_size=args.local_crops_size)


def profile_official(official, args, files):
    """Each transform of the official Compose chains wrapped with a timer."""
    timers = Timers()
    aug = build_augmentation(official, args)

    def instrument(compose):
        out = []
        for t in compose.transforms:
            if type(t).__name__ == "Compose":
                out.extend(instrument(t))
            else:
                out.append(timers.wrap(t, STEP_NAMES.get(type(t).__name__, type(t).__name__)))
        return out

    for attr, kind in (("global_transfo1", "global"), ("global_transfo2", "global"), ("local_transfo", "local")):
        compose = getattr(aug, attr)
        compose.transforms = instrument(compose)
        setattr(aug, attr, timers.crop_kind(compose, kind))
    loader = timers.wrap(official.pil_loader, "decode")
    timers.wrap(Pipeline("official", loader, aug).run, "total")(files, args.seed)
    return timers.total


def profile_ours(args, files):
    """The pixel functions of augmentations.py wrapped with a timer (the crop kind from the size of their input)."""
    timers = Timers()
    names = {"resized_crop": "crop + resize", "adjust_brightness": "colour jitter", "adjust_contrast": "colour jitter",
             "adjust_saturation": "colour jitter", "adjust_hue": "colour jitter", "grayscale": "grayscale",
             "gaussian_blur": "blur", "solarize": "solarize", "normalize": "to-tensor + normalise"}

    def kind(size):
        return "global" if size == args.global_crops_size else "local"

    def label(fn):  # resized_crop(src, i, j, h, w, size); the others take the crop(s) first
        return (lambda a: kind(a[5])) if fn == "resized_crop" else (lambda a: kind(a[0].shape[-1]))

    saved = {fn: getattr(augmentations, fn) for fn in names}
    saved_sample = augmentations.CropAugmentation.sample
    try:
        for fn, name in names.items():
            setattr(augmentations, fn, timers.wrap(saved[fn], name, label(fn)))
        augmentations.CropAugmentation.sample = timers.wrap(saved_sample, "parameters", lambda a: kind(a[0].size))
        aug = build_augmentation(augmentations, args)
        loader = timers.wrap(data.pil_loader_rgb, "decode")
        timers.wrap(Pipeline("ours", loader, aug).run, "total")(files, args.seed)
    finally:
        for fn in names:
            setattr(augmentations, fn, saved[fn])
        augmentations.CropAugmentation.sample = saved_sample
    return timers.total


def print_profile(profiles, n):
    print("\n2. Profile, CPU ms per image (share of the total), one pass over the images:")
    keys = []
    for prof in profiles.values():
        for k in prof:
            if k not in keys and k != "total":
                keys.append(k)
    order = ["decode", "parameters", "crop + resize", "flip", "colour jitter", "grayscale", "blur", "solarize",
             "to-tensor + normalise"]
    keys.sort(key=lambda k: (order.index(k.split(" (")[0]) if k.split(" (")[0] in order else 99, k))
    names = list(profiles)
    print(f"  {'step':40s}" + "".join(f"{name:>22s}" for name in names))
    for k in keys + ["other (flip, conversions, Python)", "total"]:
        row = f"  {k:40s}"
        for name in names:
            prof = profiles[name]
            if k.startswith("other"):
                v = prof["total"] - sum(v for kk, v in prof.items() if kk != "total")
            else:
                v = prof.get(k)
            row += f"{'-':>22s}" if v is None else f"{v / n * 1e3:>12.2f} ({100 * v / prof['total']:4.1f}%)"
        print(row)


# ----------------------------------------------------------------------------------------------------
# 3. DataLoader
# ----------------------------------------------------------------------------------------------------
def loader_rate(loader, batches: int, batch_size: int):
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t1), first


def build_loaders(args, official, base):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    sizes = dict(global_crops_size=args.global_crops_size, local_crops_size=args.local_crops_size)
    scales = (tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.local_crops_number)

    def make_official():  # as main_dino.py: ImageFolder, DataLoader with pin_memory and drop_last
        ds = ImageFolder(args.data_path, transform=official.DataAugmentationDINO(*scales, **sizes),
                         loader=official.pil_loader)
        return DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                          pin_memory=torch.cuda.is_available(), drop_last=True)

    def make_ours():
        ds = data.PretrainDataset(base, augmentations.DataAugmentationDINO(*scales, **sizes), seed=args.seed)
        loader = data.build_loader(ds, args.batch_size, args.num_workers, seed=args.seed,
                                   pin_memory=torch.cuda.is_available())
        loader.sampler.set_epoch(0)
        return loader
    return {"official": make_official, "ours": make_ours}


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    official = load_official()
    base, files = pick_files(args.data_path, args.num_images)
    print("DINO data pipeline benchmark: decode + 2 x %d px + %d x %d px crops (global scale %s, local %s)" % (
        args.global_crops_size, args.local_crops_number, args.local_crops_size, tuple(args.global_crops_scale),
        tuple(args.local_crops_scale)))
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}, git {git_sha()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.system()} {platform.release()}")
    import numpy
    import PIL
    import torchvision
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"Pillow {PIL.__version__}, numpy {numpy.__version__}")
    print(f"data: {args.data_path} ({len(base.samples)} images; {len(files)} per one-thread run)")
    print(f"command: python benchmarks/bench_data.py {' '.join(sys.argv[1:])}")

    print(f"\n1. One thread, decode + augmentation, images/s ({args.repeats} runs each, alternating)")
    print(f"   load average before: {loadavg()}")
    pipelines = build_pipelines(args, official)
    print_one_thread(one_thread(args, pipelines, files))
    print(f"   load average after: {loadavg()}")

    if not args.skip_profile:
        prof_files = files[:max(20, len(files) // 2)]
        profiles = {"official": profile_official(official, args, prof_files), "ours": profile_ours(args, prof_files)}
        print_profile(profiles, len(prof_files))
        print(f"   load average after: {loadavg()}")

    if not args.skip_loader and args.num_workers > 0:
        print(f"\n3. DataLoader, {args.num_workers} workers, batch {args.batch_size}, images/s over "
              f"{args.loader_batches} batches after the first (alternating, {args.loader_repeats} runs each)")
        print(f"   load average before: {loadavg()}")
        makers = build_loaders(args, official, base)
        results = collections.defaultdict(list)
        for r in range(args.loader_repeats):
            for name in (("official", "ours") if r % 2 == 0 else ("ours", "official")):
                loader = makers[name]()
                rate, first = loader_rate(loader, args.loader_batches, args.batch_size)
                results[name].append((rate, first))
                del loader
        for name in ("official", "ours"):
            rs = [x for x, _ in results[name]]
            print(f"   {name:9s} median {statistics.median(rs):7.1f} images/s   runs: "
                  f"{' '.join(f'{x:.1f}' for x in rs)}   first batch: "
                  f"{' '.join(f'{f:.1f}' for _, f in results[name])} s")
        medians = {name: statistics.median(x for x, _ in results[name]) for name in results}
        print(f"   ours / official: {medians['ours'] / medians['official']:.2f}x")
        print(f"   load average after: {loadavg()}")


if __name__ == "__main__":
    main()
