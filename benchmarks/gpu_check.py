# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""GPU validation kit: one command that proves the CUDA paths and measures speed within a few minutes of GPU time.

    bash benchmarks/gpu_check.sh                        # on a GPU: everything, about 8 minutes, table in $OUT
    python benchmarks/gpu_check.py --device cpu --quick # the same code paths on a CPU, tiny sizes, minutes

Parts (each a row or a few in the summary table; a part that fails is reported and the next one runs):
1. correctness, each against the fp32 result of the same code (TF32 off for the references):
   ViT forward and backward under bf16 autocast and under fp16 with a GradScaler; the SDPA flash kernel; the DINO
   loss and its centre; one training step of main_dino.py's loop (main_dino.build_training + engine.train_one_epoch)
   in fp32, bf16 and fp16 (same initial weights: the same first loss to mixed-precision tolerance, finite weights
   after); bitwise reruns under --deterministic; --compile (ssl_meta_arch.compile_forward_features, the path of
   both scripts' teachers) at one resolution; the SPD loss's batched eigendecompositions, cuSOLVER against MAGMA;
2. distributed: `torchrun --nproc_per_node=1` (`--nproc N` on a machine of N GPUs; 2 on CPU) of the kit's worker:
   NCCL (gloo on CPU) all-reduce, the DINO centre, SyncBatchNorm in DDP, a DDP step with the fused AdamW, chunked
   gathering, collective errors (with one process the last three are INFO rows: nothing collective to prove);
3. data: images/s of the multi-crop pipeline (main_dino.build_data over the packed CIFAR-10, all cores), for the
   ViT-S/16 benchmark's crops and the CIFAR recipe's, against what the GPU step consumes;
4. throughput and MFU: benchmarks/bench_train.py, ViT-S/16, batch 64, 2 x 224 + 10 x 96 crops, out_dim 65536:
   ours in bf16 against the official step in fp16, then ours with --compile (in the time left before the
   convergence part's reserve);
5. convergence, last, with at least CONVERGENCE_MIN_S kept for it: main_dino.py on the packed CIFAR-10 with the GPU
   recipe (recipes/cifar10_vit_32px.sh) for about 2.5 minutes (the schedule sized from the measured data rate;
   SIGTERM at the deadline checkpoints), then eval_knn.py: the k-NN after the run, the training images/s as
   epochs per 30 minutes, and whether a published curve exists for the recipe (none: said so). No projection.

The summary table is printed at the end and written to OUT/gpu_check.json and OUT/gpu_check.txt as rows are
added (a run cut short keeps what it measured); subprocess outputs go to OUT/gpu_check_subprocesses.log. The
exit code is 1 when a correctness check failed. Data: `--data` (default packed_data/cifar10.npz, made by
benchmarks/pack_cifar10.py); with --quick and no such file, a tiny packed file is made from the synthetic shapes.
The kit's files: this one (the command line, the sizes, parts 3 to 5 and the order of the parts),
gpu_check_correctness.py (part 1), gpu_check_distributed.py (part 2: the launch and the worker that torchrun starts
through this file's hidden `--_worker dist`) and gpu_check_common.py (the table, the time budget, the checks'
helpers and the subprocess runner).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS_DIR not in sys.path:  # the kit's other files, gpu_check_*.py (there already when run as a script)
    sys.path.insert(0, BENCHMARKS_DIR)

from gpu_check_common import REPO_ROOT, Budget, Report, run_logged, verdict  # noqa: E402 (first: sets up)
from gpu_check_correctness import part_correctness  # noqa: E402
from gpu_check_distributed import dist_worker, part_distributed  # noqa: E402

import torch  # noqa: E402

# The sizes of each part: on a GPU the issue's; --quick: tiny, for a CPU (every path, no CUDA kernel).
FULL = dict(
    vit=dict(arch="vit_small", patch=16, size=224, batch=32),
    loss=dict(out_dim=65536, batch=64, ncrops=12),
    step=dict(arch="vit_small", patch=16, global_size=224, local_size=96, local_crops=10, out_dim=65536, batch=32),
    det=dict(arch="vit_tiny", patch=16, global_size=96, local_size=48, local_crops=2, out_dim=4096, batch=16),
    compile=dict(arch="vit_small", patch=16, size=224, batch=32),
    spd=dict(batch=128, patches=196, ds=384, dt=1024, reps=1),
    bench=dict(arch="vit_small", patch=16, batch=64, global_size=224, local_size=96, local_crops=10, out_dim=65536,
               amp="bf16"),
    bench_iters=dict(warmup=5, iters=20), bench_compile_iters=dict(warmup=6, iters=20),
    data=dict(batch=64, batches=40, max_s=20.0),
    conv=dict(arch="vit_small", patch=4, global_size=32, local_size=16, local_crops=6, out_dim=16384, batch=256,
              seconds=150.0, min_epochs=2, max_epochs=200),
    nproc=1,
)
QUICK = dict(
    vit=dict(arch="vit_tiny", patch=16, size=32, batch=2),
    loss=dict(out_dim=256, batch=4, ncrops=4),
    step=dict(arch="vit_nano", patch=16, global_size=32, local_size=16, local_crops=2, out_dim=256, batch=4),
    det=dict(arch="vit_nano", patch=16, global_size=32, local_size=16, local_crops=2, out_dim=128, batch=2),
    compile=dict(arch="vit_nano", patch=16, size=32, batch=2),
    spd=dict(batch=4, patches=16, ds=8, dt=12, reps=1),
    bench=dict(arch="vit_tiny", patch=16, batch=2, global_size=32, local_size=16, local_crops=2, out_dim=256,
               amp="auto"),
    bench_iters=dict(warmup=1, iters=1), bench_compile_iters=None,
    data=dict(batch=8, batches=3, max_s=20.0),
    conv=dict(arch="vit_nano", patch=8, global_size=32, local_size=16, local_crops=2, out_dim=256, batch=16,
              seconds=60.0, min_epochs=2, max_epochs=2),
    nproc=2,
)
# Throughput (compiled included) before convergence: the speed figures are what the first run must bring back, and
# convergence, last, gets at least CONVERGENCE_MIN_S whatever ran before (the parts before it see that much less).
PARTS = ("correctness", "distributed", "data", "throughput", "compile_throughput", "convergence")
CONVERGENCE_MIN_S = 150.0  # 90 s of training (the floor below) + up to 60 s for the final eval_knn.py
CONVERGENCE_FLOOR_S = 90.0
COMPILE_NEEDS_S = 100.0


# ----------------------------------------------------------------------------------------------------
# 3. Data pipeline
# ----------------------------------------------------------------------------------------------------
def pipeline_rate(device: torch.device, data_path: str, crops: dict, cfg: dict, workers: int) -> dict:
    """Images/s of main_dino.build_data's loader (decode + multi-crop + collate + pinned transfer to the host
    side) with `workers` workers, after the first batch (worker start-up) and up to `batches` batches."""
    import main_dino
    argv = ["--data_path", data_path, "--batch_size_per_gpu", str(cfg["batch"]), "--num_workers", str(workers),
            "--global_crops_size", str(crops["global_size"]), "--local_crops_size", str(crops["local_size"]),
            "--local_crops_number", str(crops["local_crops"]), "--patch_size", str(crops["patch"])]
    args = main_dino.get_args_parser().parse_args(argv)
    args.rank, args.world_size, args.device = 0, 1, device
    dataset, loader = main_dino.build_data(args)
    loader.sampler.set_epoch(0)
    it = iter(loader)
    start = time.time()
    next(it)
    first = time.time() - start
    n, start = 0, time.time()
    for _ in range(min(cfg["batches"], len(loader) - 1)):
        next(it)
        n += cfg["batch"]
        if time.time() - start > cfg["max_s"]:
            break
    seconds = time.time() - start
    del it, loader
    return {"images_per_s": n / seconds if seconds > 0 else float("nan"), "first_batch_s": first, "images": n,
            "dataset": len(dataset)}


def part_data(report: Report, device: torch.device, sizes: dict, data_path: str, results: dict) -> None:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bench_crops, conv = sizes["bench"], sizes["conv"]
    for name, crops in (("benchmark crops", bench_crops), ("CIFAR recipe crops", dict(
            global_size=conv["global_size"], local_size=conv["local_size"], local_crops=conv["local_crops"],
            patch=conv["patch"]))):
        try:
            r = pipeline_rate(device, data_path, crops, sizes["data"], workers)
        except Exception as e:
            report.add("data", f"pipeline, {name}", "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
            continue
        results[name] = r
        report.add("data", f"pipeline images/s, {name}", "INFO", f"{r['images_per_s']:.0f} images/s",
                   f"{workers} workers, batch {sizes['data']['batch']}, 2x{crops['global_size']} + "
                   f"{crops['local_crops']}x{crops['local_size']} px from {os.path.basename(data_path)}; first batch "
                   f"{r['first_batch_s']:.1f} s", images_per_s=r["images_per_s"])


# ----------------------------------------------------------------------------------------------------
# 4. Throughput and MFU (bench_train.py)
# ----------------------------------------------------------------------------------------------------
def part_throughput(report: Report, device: torch.device, sizes: dict, work: str, budget: Budget,
                    results: dict, compiled: bool) -> None:
    iters = sizes["bench_compile_iters" if compiled else "bench_iters"]
    if iters is None:
        report.add("throughput", "ours bf16 + --compile", "SKIP", "--quick: --compile is checked in correctness")
        return
    if compiled and budget.left() < COMPILE_NEEDS_S:
        report.add("throughput", "ours bf16 + --compile", "SKIP", f"{budget.left():.0f} s left before the convergence "
                   f"part's reserve, compiling needs {COMPILE_NEEDS_S:.0f}", "run it alone: gpu_check.sh --only "
                   "compile_throughput")
        return
    out = os.path.join(work, f"bench_{'compile' if compiled else 'eager'}.json")
    b = sizes["bench"]
    cmd = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench_train.py"), "--arch", b["arch"],
           "--patch_size", b["patch"], "--batch_size", b["batch"], "--global_crops_size", b["global_size"],
           "--local_crops_size", b["local_size"], "--local_crops_number", b["local_crops"], "--out_dim", b["out_dim"],
           "--amp_dtype", b["amp"], "--warmup", iters["warmup"], "--iters", iters["iters"], "--json", out]
    cmd += ["--impl", "ours", "--compile"] if compiled else ["--impl", "both"]
    timeout = max(30.0, budget.left() - (5 if compiled else 0))
    code, output = run_logged(report, "bench_train" + (" --compile" if compiled else ""), cmd, timeout)
    if code is None:
        report.add("throughput", "bench_train.py" + (" --compile" if compiled else ""), "SKIP",
                   f"stopped after {timeout:.0f} s (time budget)", output[-400:])
        return
    if code != 0 or not os.path.isfile(out):
        report.add("throughput", "bench_train.py" + (" --compile" if compiled else ""), "FAIL", f"exit {code}",
                   output[-400:])
        return
    with open(out) as f:
        bench = json.load(f)
    results["compile" if compiled else "eager"] = bench
    for impl in ("ours", "official"):
        if impl not in bench:
            continue
        r = bench[impl]
        label = f"{b['arch']}/{b['patch']} {impl}" + (" + --compile" if compiled else "") + \
            ((f" ({b['amp']})" if impl == "ours" else " (fp16 + GradScaler)") if device.type == "cuda" else " (CPU)")
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        mem = f", peak {r['cuda_peak_mib'] / 1024:.1f} GiB" if r.get("cuda_peak_mib") else ""
        report.add("throughput", label, "INFO",
                   f"{r['images_per_s']:.1f} images/s, {r['tflops']:.3g} TFLOP/s{mfu}{mem}", r["desc"][:160],
                   images_per_s=r["images_per_s"], tflops=r["tflops"], mfu=r.get("mfu"))
        if impl == "ours" and r.get("s_per_iter_on_device"):
            mfu_dev = f", MFU {100 * r['mfu_on_device']:.1f}%" if r.get("mfu_on_device") is not None else ""
            report.add("throughput", label + ", crops already on the GPU", "INFO",
                       f"{r['images_per_s_on_device']:.1f} images/s{mfu_dev}", "the model's own speed: no host copy",
                       images_per_s=r["images_per_s_on_device"], mfu=r.get("mfu_on_device"))
            report.add("throughput", "host->GPU copy of the crops per step", "INFO",
                       f"{1000 * r['copy_s']:.1f} ms ({100 * r['copy_s'] / r['s_per_iter']:.0f}% of a step)",
                       f"{r['copy_mb']:.0f} MB pinned, non_blocking, on the compute stream (as the training loop "
                       f"copies); step with copy {1000 * r['s_per_iter']:.1f} ms, without "
                       f"{1000 * r['s_per_iter_on_device']:.1f} ms", copy_s=r["copy_s"])
        if impl == "ours" and r.get("mfu") is not None:
            report.add("throughput", "goal: ours >= 45% MFU" + (" (--compile)" if compiled else ""),
                       "MET" if r["mfu"] >= 0.45 else "MISSED", f"{100 * r['mfu']:.1f}%")
    if "speedup" in bench:
        report.add("throughput", "goal: ours >= 2x official images/s", "MET" if bench["speedup"] >= 2 else "MISSED",
                   f"{bench['speedup']:.2f}x")
    if compiled and "eager" in results and "ours" in results["eager"]:
        official = results["eager"].get("official")
        if official:
            ratio = bench["ours"]["images_per_s"] / official["images_per_s"]
            report.add("throughput", "goal: ours + --compile >= 2x official", "MET" if ratio >= 2 else "MISSED",
                       f"{ratio:.2f}x")


# ----------------------------------------------------------------------------------------------------
# 5. Convergence
# ----------------------------------------------------------------------------------------------------
def part_convergence(report: Report, device: torch.device, sizes: dict, data_path: str, work: str,
                     budget: Budget, results: dict) -> None:
    import data
    cfg = sizes["conv"]
    if budget.left() < CONVERGENCE_FLOOR_S:
        report.add("convergence", "main_dino.py CIFAR recipe", "SKIP", f"{budget.left():.0f} s left",
                   "run it alone: gpu_check.sh --only data convergence")
        return
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_train = len(data.PackedImages(data_path, "train"))
    seconds = convergence_seconds(cfg["seconds"], budget.left())
    rate = results.get("data", {}).get("CIFAR recipe crops", {}).get("images_per_s")
    # the schedule that the data pipeline can feed in the time (the GPU is faster at 32 px); SIGTERM at the
    # deadline checkpoints the exact position when it is slower
    epochs = int(seconds * 0.8 * rate / n_train) if rate else cfg["min_epochs"]
    epochs = max(cfg["min_epochs"], min(cfg["max_epochs"], epochs))
    out = os.path.join(work, "convergence")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "main_dino.py"), "--data_path", data_path,
           "--arch", cfg["arch"], "--patch_size", str(cfg["patch"]), "--global_crops_size", str(cfg["global_size"]),
           "--local_crops_size", str(cfg["local_size"]), "--local_crops_number", str(cfg["local_crops"]),
           "--out_dim", str(cfg["out_dim"]), "--batch_size_per_gpu", str(cfg["batch"]), "--epochs", str(epochs),
           "--warmup_epochs", str(max(1, epochs // 10)), "--knn_data_path", data_path, "--knn_resize_size", "32",
           "--knn_crop_size", "32", "--knn_eval_freq", str(max(1, epochs // 4)), "--num_workers", str(workers),
           "--saveckp_freq", "100000", "--print_freq", "50", "--output_dir", out]
    start = time.time()
    code, output = run_logged(report, "convergence", cmd, seconds)
    train_s = time.time() - start
    log_path = os.path.join(out, "log.txt")
    records = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    stopped = code is None
    if code not in (0, None) or not os.path.isfile(os.path.join(out, "checkpoint.pth")):
        report.add("convergence", "main_dino.py on CIFAR-10", "FAIL", f"exit {code}", output[-400:])
        return
    losses = [r["train_loss"] for r in records]
    finite = all(math.isfinite(x) for x in losses)
    rates = [r.get("train_images_per_sec", 0) for r in records]
    report.add("convergence", "main_dino.py CIFAR recipe, finite", verdict(finite and bool(records)),
               f"{len(records)}/{epochs} epochs in {train_s:.0f} s" + (" (stopped at the deadline)" if stopped else ""),
               f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no epoch finished",
               epochs_done=len(records), epochs_planned=epochs)
    if rates:
        results["train_images_per_s"] = max(rates)
        report.add("convergence", "training images/s (CIFAR recipe)", "INFO", f"{max(rates):.0f} images/s",
                   f"{cfg['arch']}/{cfg['patch']}, batch {cfg['batch']}, 2x{cfg['global_size']} + "
                   f"{cfg['local_crops']}x{cfg['local_size']} px, {workers} workers", images_per_s=max(rates))
    # the k-NN curve: (minutes of training and evaluation so far, top-1) after each evaluated epoch
    points, elapsed = [], 0.0
    for r in records:
        elapsed += r.get("train_epoch_time", 0) + r.get("knn_time", 0)
        if "knn_top1" in r:
            points.append((elapsed / 60, r["knn_top1"]))
    eval_cmd = [sys.executable, os.path.join(REPO_ROOT, "eval_knn.py"), "--arch", cfg["arch"], "--patch_size",
                str(cfg["patch"]), "--pretrained_weights", os.path.join(out, "checkpoint.pth"), "--checkpoint_key",
                "teacher", "--data_path", data_path, "--resize_size", "32", "--crop_size", "32", "--nb_knn", "20",
                "--num_workers", str(workers), "--batch_size_per_gpu", "256"]
    code, output = run_logged(report, "eval_knn", eval_cmd, max(60.0, budget.left() - 5))
    top1 = None
    for line in output.splitlines():
        if line.startswith("20-NN classifier result"):
            top1 = float(line.split("Top1: ")[1].split(",")[0])
    if top1 is None:
        report.add("convergence", "eval_knn.py 20-NN", "FAIL", f"exit {code}", output[-400:])
        return
    minutes = (elapsed or train_s) / 60
    report.add("convergence", "eval_knn.py 20-NN top-1 (test set)", "INFO", f"{top1:.2f}% after {minutes:.1f} min",
               f"{len(records)} epochs of the {epochs}-epoch schedule; online k-NN: "
               + ", ".join(f"{p[1]:.1f}% at {p[0]:.1f} min" for p in points), top1=top1, minutes=minutes, curve=points)
    if rates:  # what 30 minutes hold, from the measured speed (no extrapolation of the accuracy)
        epochs_30 = epochs_in(1800.0, max(rates), n_train)
        report.add("convergence", "epochs per 30 minutes (CIFAR recipe)", "INFO", f"{epochs_30:.0f} epochs",
                   f"{max(rates):.0f} images/s x 1800 s / {n_train} images; the goal (>= 85% 20-NN in 30 min) needs "
                   "that run: recipes/cifar10_vit_32px.sh with --epochs set to this", epochs_30=epochs_30)
    report.add("convergence", "published curve for this recipe", "INFO", "none known", PUBLISHED_CURVE_NOTE)


# No published k-NN curve is known for DINO ViT-S/4 on CIFAR-10 at 32 px (the DINO and DINOv2 papers and repositories
# report pretraining on ImageNet-scale data); said in the table rather than compared with another recipe's curve.
PUBLISHED_CURVE_NOTE = ("none known: DINO and DINOv2 report pretraining on ImageNet-scale data; compare with a full "
                        "run of recipes/cifar10_vit_32px.sh on the same GPU")


def epochs_in(seconds: float, images_per_s: float, n_train: int) -> float:
    return seconds * images_per_s / n_train


def convergence_seconds(planned: float, left: float) -> float:
    """The training time of the convergence part: the plan, cut to leave 60 s for eval_knn.py, but never below the
    floor when the reserve was kept for it (the plan of a run with --only convergence, or a short --budget_s, may be
    less)."""
    floor = CONVERGENCE_FLOOR_S if left >= CONVERGENCE_MIN_S else 20.0
    return min(planned, max(floor, left - 60))


def reserve_before(parts, i: int, quick: bool) -> float:
    """Seconds that part `parts[i]` must leave untouched: the convergence part's minimum when it comes later."""
    return CONVERGENCE_MIN_S if "convergence" in parts[i + 1:] and not quick else 0.0


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def quick_data(work: str) -> str:
    """A tiny packed file (10 images per class, train and val) of the synthetic shapes, for --quick."""
    import data
    import synthetic
    root = synthetic.make_synthetic_dataset()
    path = os.path.join(work, "tiny_packed.npz")
    data.pack_image_folders({"train": os.path.join(root, "train"), "val": os.path.join(root, "val")}, path,
                            per_class=10)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="GPU validation kit (issue 17): correctness, speed, convergence.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (for a CPU: every path but the CUDA kernels)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO_ROOT, "runs", "gpu_check"),
                   help="folder of the summary (gpu_check.json, gpu_check.txt) and logs (default: $OUT)")
    p.add_argument("--data", default=None, help="packed CIFAR-10 (default packed_data/cifar10.npz, made by "
                   "benchmarks/pack_cifar10.py; with --quick: a tiny packed file of the synthetic shapes)")
    p.add_argument("--work_dir", default=None, help="scratch folder (checkpoints; default: a temporary one)")
    p.add_argument("--budget_s", default=None, type=float,
                   help="seconds for the whole check (default 450 on GPU, 900 with --quick); parts shrink to fit")
    p.add_argument("--nproc", default=None, type=int, help="""processes of the distributed part (default: 1 on a
        GPU machine, 2 on CPU); on a machine of several GPUs give their number: with one process SyncBatchNorm, the
        chunked gather and the collective errors are not exercised (INFO rows)""")
    p.add_argument("--only", nargs="+", default=None, choices=PARTS, help="run only these parts")
    p.add_argument("--skip", nargs="+", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--_worker", default=None, choices=["dist"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker == "dist":
        dist_worker(args.out)
        return 0

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda but no GPU is visible (use --device cpu --quick on a CPU)\n")
        return 2
    sizes = dict(QUICK if args.quick else FULL)
    if args.nproc is not None:
        gpus = torch.cuda.device_count() if device.type == "cuda" else None
        if args.nproc < 1 or (gpus is not None and args.nproc > gpus):
            sys.stderr.write(f"error: --nproc {args.nproc}: give 1 to {gpus or 'N'} (the GPUs of this machine)\n")
            return 2
        sizes["nproc"] = args.nproc
    elif device.type == "cpu":
        sizes["nproc"] = 2  # gloo: two processes prove the collectives on any machine
    budget = Budget(args.budget_s or (900.0 if args.quick else 450.0))
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    import runtime
    runtime.gpu_math_setup(False)  # what the training scripts set: TF32 and cudnn autotuning
    if device.type == "cuda":
        torch.cuda.set_device(device)
    meta = {"device": str(device), "quick": args.quick, "torch": torch.__version__,
            "cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "CPU", "cpus": os.cpu_count(), "python": platform.python_version(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(__file__, REPO_ROOT)] + (argv if argv is not None else sys.argv[1:])),
            "magma": bool(getattr(torch.cuda, "has_magma", False))}
    report = Report(args.out, meta)
    print(f"# GPU check on {meta['device_name']} ({device}), torch {torch.__version__}, budget "
          f"{budget.seconds:.0f} s, work dir {work}", flush=True)
    parts = [q for q in (args.only or PARTS) if q not in args.skip]
    data_path = args.data or os.path.join(REPO_ROOT, "packed_data", "cifar10.npz")
    if any(q in parts for q in ("data", "convergence")) and (args.quick and not args.data
                                                             or not os.path.isfile(data_path)):
        if args.quick:
            data_path = quick_data(work)
        else:
            report.add("data", "packed CIFAR-10", "FAIL", f"{data_path} missing",
                       "make it with benchmarks/pack_cifar10.py and name it in the device run's carry")
            parts = [q for q in parts if q not in ("data", "convergence")]
    results = {"data": {}}
    interrupted = []

    def on_term(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        for i, part in enumerate(parts):
            # what the convergence part is guaranteed is not the earlier parts' to spend
            budget.reserved = reserve_before(parts, i, args.quick)
            if budget.left() < 15:
                report.add(part, "(part)", "SKIP", "out of time budget")
                continue
            print(f"\n## {part} ({budget.left():.0f} s left)", flush=True)
            try:
                if part == "correctness":
                    part_correctness(report, device, sizes, work)
                elif part == "distributed":
                    part_distributed(report, device, sizes, work, budget)
                elif part == "data":
                    part_data(report, device, sizes, data_path, results["data"])
                elif part == "throughput":
                    part_throughput(report, device, sizes, work, budget, results, compiled=False)
                elif part == "convergence":
                    part_convergence(report, device, sizes, data_path, work, budget, results)
                elif part == "compile_throughput":
                    part_throughput(report, device, sizes, work, budget, results, compiled=True)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                report.add(part, "(part)", "FAIL", f"{type(e).__name__}: {str(e)[:200]}",
                           traceback.format_exc(limit=4)[-600:])
        # supply against demand: does the data pipeline keep up with the GPU step?
        for name, demand in (("benchmark crops", results.get("eager", {}).get("ours", {}).get("images_per_s")),
                             ("CIFAR recipe crops", results.get("train_images_per_s"))):
            supply = results["data"].get(name, {}).get("images_per_s")
            if supply and demand:
                bound = "compute-bound (the loader keeps up)" if supply >= 1.1 * demand else \
                    "data-bound (the loader is the limit)" if supply < 0.95 * demand else "balanced"
                report.add("data", f"supply / demand, {name}", "INFO", f"{supply / demand:.2f}x: {bound}",
                           f"pipeline {supply:.0f} vs step {demand:.0f} images/s")
    except KeyboardInterrupt:
        report.add("kit", "interrupted", "SKIP", f"signal {interrupted[0] if interrupted else 'SIGINT'}: the rest "
                   "was not run")
    finally:
        report.meta["elapsed_s"] = time.time() - budget.start
        report.write()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + report.summary(), flush=True)
    print(f"Written: {os.path.join(args.out, 'gpu_check.json')}, {os.path.join(args.out, 'gpu_check.txt')}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
