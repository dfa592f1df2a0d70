# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""An exported ViT-S/16 (export_backbone.py) run by onnxruntime on the CPU, against PyTorch eager and torch.compile:
ms per batch and images/s at 224 px, batches of 1 and 32. Prints the figures; asserts nothing.

    .venv/bin/python benchmarks/bench_export.py [--threads 2] [--repeats 5]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import export_backbone  # noqa: E402
import exporting  # noqa: E402


def timed(fn, images: torch.Tensor, repeats: int) -> float:
    """Median seconds of `fn(images)` over `repeats` runs, after two warm-up runs."""
    for _ in range(2):
        fn(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=os.cpu_count(), type=int, help="intra-op threads of torch and onnxruntime")
    p.add_argument("--repeats", default=5, type=int)
    p.add_argument("--batches", default=[1, 32], type=int, nargs="+")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = backbones.build_backbone("vit_small", 16)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights, onnx_path = os.path.join(tmp, "vits16.pth"), os.path.join(tmp, "vits16.onnx")
        torch.save(model.state_dict(), weights)
        export_backbone.export_backbone(export_backbone.get_args_parser().parse_args(
            [weights, onnx_path, "--arch", "vit_small", "--patch_size", "16"]))
        run_onnx, _ = exporting.load_runner(onnx_path, threads=args.threads)
        compiled = torch.compile(model)
        runners = {"PyTorch eager (fp32)": lambda x: model(x), "torch.compile (fp32)": lambda x: compiled(x),
                   "onnxruntime CPU (fp32)": lambda x: run_onnx(x)["cls_token"]}
        print(f"\nViT-S/16, 224 px, fp32, {args.threads} threads, torch {torch.__version__}, CPU: "
              f"{cpu_name()}")
        print(f"{'runner':<26} {'batch':>5} {'ms/batch':>10} {'images/s':>9}")
        for batch in args.batches:
            images = torch.randn(batch, 3, 224, 224)
            with torch.no_grad():
                for name, fn in runners.items():
                    seconds = timed(fn, images, args.repeats)
                    print(f"{name:<26} {batch:>5} {1000 * seconds:>10.1f} {batch / seconds:>9.1f}", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
