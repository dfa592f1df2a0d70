# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Pack CIFAR-10 (or any ImageFolder splits) into one compact file that `--data_path` accepts.

    python benchmarks/pack_cifar10.py                       # ../shared/data/cifar10 -> packed_data/cifar10.npz
    python benchmarks/pack_cifar10.py --root DATA --out packed_data/mine.npz --splits train val
    python main_dino.py --data_path packed_data/cifar10.npz ...                  # the train split
    python eval_knn.py --data_path packed_data/cifar10.npz --resize_size 32 --crop_size 32 ...  # train + test

The JPEG files are stored byte for byte (their shared header once), so training on the packed file sees exactly
the pixels of the folders: 60,000 CIFAR-10 images in about 16 MB, one file to copy to a GPU machine instead of
60,000 (see benchmarks/README.md). The format is `data.pack_image_folders` / `data.PackedImages`.
`packed_data/` is ignored by git.
"""
import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import data  # noqa: E402
from utils import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10"),
                   help="folder holding one ImageFolder tree per split")
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="the split folders to pack")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "packed_data", "cifar10.npz"), help="the file to write")
    p.add_argument("--per_class", default=None, type=int, help="only the first N images of each class (tests)")
    args = p.parse_args(argv)
    missing = [s for s in args.splits if not os.path.isdir(os.path.join(args.root, s))]
    if missing:
        sys.stderr.write(f"error: {args.root} has no {', '.join(missing)} folder(s): give --root with one "
                         "ImageFolder tree per split (CIFAR-10 as image folders: train/ and test/)\n")
        return 2
    start = time.time()
    try:
        counts = data.pack_image_folders({s: os.path.join(args.root, s) for s in args.splits}, args.out,
                                         per_class=args.per_class)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    size = os.path.getsize(args.out)
    print(f"Packed {', '.join(f'{n} {s}' for s, n in counts.items())} images of {args.root} into {args.out} "
          f"({size / 2**20:.1f} MiB) in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
