# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Time to list a large image collection (layouts.py): the first walk, the cached second run, and torchvision's
ImageFolder listing (the former data.py) as the baseline.

    python benchmarks/bench_walk.py                           # 100 folders x 1,000 files under /tmp
    python benchmarks/bench_walk.py --root /mnt/nfs/scratch --folders 1000 --files 1281

Generates (once; reused by later runs) `--folders` folders of `--files` empty files with image extensions under
`--root`/bench_walk_tree: only the walk is timed, so the files need not be images. The folders' modification
times are set an hour back, since the cache does not trust folders changed in the seconds before a walk. Each
figure is the median of `--repeats` runs. The operating system's own cache of the folders is warm (the tree was
just made or walked), as on the second epoch of a machine, not the first boot: on a network file system the first
walk is slower and gains more from threads. Prints figures; asserts nothing; `--clean` removes the tree.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import layouts  # noqa: E402

EXTENSIONS = (".jpg", ".JPEG", ".png", ".webp")


def make_tree(root: str, folders: int, files: int) -> str:
    tree = os.path.join(root, "bench_walk_tree")
    marker = os.path.join(tree, f".complete_{folders}x{files}")
    if os.path.exists(marker):
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    start = time.time()
    for i in range(folders):
        folder = os.path.join(tree, f"n{i:08d}")
        os.makedirs(folder)
        for j in range(files):
            open(os.path.join(folder, f"n{i:08d}_{j}{EXTENSIONS[j % len(EXTENSIONS)]}"), "wb").close()
    aged = time.time_ns() - 3600 * 10 ** 9
    for dirpath, _, _ in os.walk(tree):
        os.utime(dirpath, ns=(aged, aged))
    open(marker, "w").close()  # hidden: not walked; made after the ageing, so the root's time moved: age it again
    os.utime(tree, ns=(aged, aged))
    print(f"made {folders:,} folders x {files:,} files in {tree} in {time.time() - start:.1f} s")
    return tree


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(args: argparse.Namespace) -> None:
    tree = make_tree(args.root, args.folders, args.files)
    n = args.folders * args.files
    cache_dir = tempfile.mkdtemp(prefix="bench_walk_cache_")
    rows = []

    def report(name: str, seconds: float, count: int) -> None:
        assert count == n, f"{name} found {count:,} files, expected {n:,}"
        rows.append((name, seconds))
        print(f"{name:<44} {seconds:8.3f} s {n / seconds:12,.0f} files/s", flush=True)

    quiet = lambda **kw: layouts.read_collection([tree], loader=None, verbose=False, **kw)  # noqa: E731
    try:
        from torchvision.datasets import ImageFolder
        seconds, ds = timed(lambda: ImageFolder(tree, loader=lambda p: p), args.repeats)
        report("torchvision ImageFolder (baseline)", seconds, len(ds.samples))
    except ImportError:
        print("torchvision not installed: no baseline")
    for threads in args.threads:
        seconds, ds = timed(lambda: quiet(threads=threads), args.repeats)
        report(f"first walk, no cache, {threads} thread(s)", seconds, len(ds))
    threads = args.threads[-1]
    seconds, ds = timed(lambda: (shutil.rmtree(cache_dir, ignore_errors=True), quiet(threads=threads,
                                                                                     cache_dir=cache_dir))[1], 1)
    report(f"first walk + writing the cache, {threads} thread(s)", seconds, len(ds))
    size = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir))
    for t in sorted({1, threads}):
        seconds, ds = timed(lambda: quiet(threads=t, cache_dir=cache_dir), args.repeats)
        report(f"second run, from the cache, {t} thread(s)", seconds, len(ds))
    print(f"cache file: {size / 2 ** 20:.1f} MiB for {n:,} files; load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs")
    shutil.rmtree(cache_dir, ignore_errors=True)
    if args.clean:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp", help="where to make the tree (bench_walk_tree/ in it)")
    parser.add_argument("--folders", default=100, type=int)
    parser.add_argument("--files", default=1000, type=int, help="files per folder")
    parser.add_argument("--threads", default=[1, layouts.WALK_THREADS], type=int, nargs="+",
                        help="thread counts of the uncached walk; the last one also writes the cache")
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--clean", action="store_true", help="remove the tree at the end")
    main(parser.parse_args())
