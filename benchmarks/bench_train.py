# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Benchmark of the DINO training step: this framework (`ours`) against the official code (`official`).

Prints figures; asserts nothing. Each implementation runs in its own fresh subprocess (so that peak
memory is its own), on the same inputs:

    python benchmarks/bench_train.py                                  # both, vit_tiny, synthetic tensors
    python benchmarks/bench_train.py --impl ours --arch vit_small --batch_size 32 --iters 10
    python benchmarks/bench_train.py --data_path /path/to/imagenet/train --num_workers 8   # real loading

- `ours` builds data, models, loss, optimizer and schedules with `main_dino.build_data` and
  `main_dino.build_training` (what `main_dino.train_dino` uses) and times `engine.train_one_epoch`
  itself, over a loader truncated to warmup + iters batches.
- `official` is the official step rebuilt from the test-only reference `tests/official_dino.py`
  (explicit-softmax ViT, weight_norm DINOHead, official MultiCropWrapper and per-pair DINOLoss,
  torch.optim.AdamW with default settings, per-parameter clip loop with .item(), Python-loop EMA,
  loss.item() every iteration; fp16 GradScaler on CUDA), in the official order of operations.

Per-iteration time = time between two successive batch requests of the training loop (the loader is
wrapped in an object that stamps `time.perf_counter()` at each request; on CUDA it synchronises first),
so it covers data waiting + the whole step. The first `--warmup` iterations are discarded.
FLOPs: one forward (teacher on the 2 global crops, student on all crops) + loss + backward, counted by
`torch.utils.flop_counter.FlopCounterMode` outside the timed loop; fused attention kernels are counted as
the explicit attention they replace (FlopCounterMode ignores the CPU flash kernels and counts a
recomputation in the CUDA ones), so both implementations report the same model FLOPs.
MFU (GPU): achieved model FLOP/s over the device's dense bf16/fp16 tensor-core peak (`PEAK_TFLOPS`, by
`torch.cuda.get_device_name`; `--peak_tflops` for another device), whatever the precision of the run: the
official fp16 step and our bf16 one are measured against the same ceiling. `--json FILE` writes the summary.
Figures on a machine shared with other work are noisy: "CPU time / wall" and the load averages show it,
the fastest-iteration figures are the least disturbed, `--repeats` alternates fresh runs.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULT_MARKER = "@@BENCH_RESULT@@ "

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets (fp16 for the GPUs without
# bf16, V100 and T4). The first entry whose name occurs in torch.cuda.get_device_name() applies: the more
# specific names first. The H200 has the H100 SXM's arithmetic (same chip); on the H200 here, an 8192^3 bf16
# matrix product reached about 790 of its 989 TFLOP/s (random data).
PEAK_TFLOPS = (
    ("GB200", 2450.0), ("B200", 2250.0), ("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0),
    ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(device_name: str):
    """The dense bf16 peak of a GPU by name (TFLOP/s), or None when unknown."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the DINO training step (ours vs the official code).")
    p.add_argument("--impl", default="both", choices=["ours", "official", "both"])
    p.add_argument("--arch", default="vit_tiny",
                   help="our --arch (vit_tiny/vit_small/vit_base/vit_large, deit_* aliases, ...); the official "
                        "reference has vit_tiny/vit_small/vit_base only")
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--batch_size", default=16, type=int, help="images per iteration (batch_size_per_gpu)")
    p.add_argument("--global_crops_size", default=224, type=int)
    p.add_argument("--local_crops_size", default=96, type=int)
    p.add_argument("--local_crops_number", default=8, type=int)
    p.add_argument("--out_dim", default=65536, type=int)
    p.add_argument("--iters", default=6, type=int, help="timed iterations")
    p.add_argument("--warmup", default=2, type=int, help="untimed iterations before the timed ones")
    p.add_argument("--epoch", default=1, type=int,
                   help="epoch index given to the loop. The default 1 is past --freeze_last_layer 1 (steady "
                        "state: the last layer is trained); 0 measures the first epoch, where the last layer's "
                        "gradient is dropped and the optimizer skips it")
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--data_path", default=None,
                   help="image folder (ImageFolder layout) to load through the real pipelines; default: "
                        "synthetic random tensors (the step alone)")
    p.add_argument("--num_workers", default=2, type=int, help="data loading workers with --data_path")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--compile", action="store_true", help="ours with --compile true (torch.compile the backbones; "
                   "the warm-up iterations include the compilation, so use --warmup 3 or more)")
    p.add_argument("--grad_checkpointing", action="store_true", help="ours with --grad_checkpointing true")
    p.add_argument("--amp_dtype", default="auto", choices=["auto", "bf16", "fp16"],
                   help="ours with this --amp_dtype (and --use_fp16 true): auto = bf16 on GPUs that support it, "
                        "fp32 on CPU; bf16 also turns on bf16 autocast on CPU. The official code runs fp16 + "
                        "GradScaler on CUDA and fp32 on CPU, whatever this flag")
    p.add_argument("--repeats", default=1, type=int,
                   help="run each implementation this many times (alternating order, a fresh process each); "
                        "the summary takes the median of the per-run medians")
    p.add_argument("--peak_tflops", default=None, type=float,
                   help="the device's dense bf16 peak for the MFU (default: from the table, by GPU name)")
    p.add_argument("--json", default=None, help="also write the summary (per implementation) to this JSON file")
    p.add_argument("--_child", default=None, choices=["ours", "official"], help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------------
# Environment description
# ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def git_sha() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                      stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                        stderr=subprocess.DEVNULL).decode().strip()
        return sha + (" (uncommitted changes)" if dirty else "")
    except Exception:
        return "n/a"


# ----------------------------------------------------------------------------------------------------
# Child: helpers
# ----------------------------------------------------------------------------------------------------
def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class TimedLoader:
    """Yields the first `n` batches of `loader`, stamping time.perf_counter() at each batch request
    (and at the request that follows the last batch, which ends the last iteration)."""

    def __init__(self, loader, n: int, device):
        self.loader, self.n, self.device = loader, n, device
        self.stamps, self.cpu_stamps = [], []
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return self.n

    def _stamp(self) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())  # CPU time of all this process's threads

    def __iter__(self):
        self._stamp()
        it = iter(self.loader)
        for i in range(self.n):
            if i > 0:
                self._stamp()
            try:
                batch = next(it)
            except StopIteration:
                raise SystemExit(f"the data has only {i} batches of this size; "
                                 "lower --iters/--warmup/--batch_size")
            yield batch
        self._stamp()


def synthetic_batch(args, torch):
    """The same crops for both implementations: [g1, g2, l1, ..., lN], each [B, 3, S, S]."""
    g = torch.Generator().manual_seed(args.seed)
    B = args.batch_size
    crops = [torch.randn(B, 3, args.global_crops_size, args.global_crops_size, generator=g) for _ in range(2)]
    crops += [torch.randn(B, 3, args.local_crops_size, args.local_crops_size, generator=g)
              for _ in range(args.local_crops_number)]
    if torch.cuda.is_available():
        crops = [c.pin_memory() for c in crops]  # as a pin_memory=True DataLoader hands them over
    return crops


def count_step_flops(step_fn, torch) -> int:
    """Model FLOPs of `step_fn()` (forward + loss + backward).

    Fused attention is counted as the explicit attention it replaces: 2 matmuls forward and 4 backward.
    FlopCounterMode does not know the CPU flash kernels at all, and counts a 5th (recomputed) matmul in
    the backward of the CUDA ones; the same formula for both keeps ours and the official comparable.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    aten = torch.ops.aten

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            custom[getattr(aten, name)] = fwd
        if hasattr(aten, name + "_backward"):
            custom[getattr(aten, name + "_backward")] = bwd
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step_fn()
    return int(counter.get_total_flops())


def load_official():
    path = os.path.join(REPO_ROOT, "tests", "official_dino.py")
    spec = importlib.util.spec_from_file_location("official_dino_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# Child: ours
# ----------------------------------------------------------------------------------------------------
def run_ours(bench, device, torch, synthetic):
    import torch.backends.cudnn as cudnn
    import engine
    import main_dino

    out_dir = tempfile.mkdtemp(prefix="bench_dino_")
    argv = ["--arch", bench.arch, "--patch_size", str(bench.patch_size), "--out_dim", str(bench.out_dim),
            "--batch_size_per_gpu", str(bench.batch_size), "--local_crops_number", str(bench.local_crops_number),
            "--global_crops_size", str(bench.global_crops_size), "--local_crops_size", str(bench.local_crops_size),
            "--num_workers", str(bench.num_workers), "--seed", str(bench.seed), "--output_dir", out_dir,
            "--data_path", bench.data_path or "synthetic",
            "--compile", str(bench.compile), "--grad_checkpointing", str(bench.grad_checkpointing),
            "--amp_dtype", bench.amp_dtype]
    args = main_dino.get_args_parser().parse_args(argv)
    os.rmdir(out_dir)  # train_one_epoch writes nothing; only the flag needs a value
    main_dino.check_args(args)
    args.rank, args.world_size, args.gpu, args.device = 0, 1, 0, device
    if bench.epoch >= args.epochs:
        raise SystemExit(f"--epoch must be below the schedule's {args.epochs} epochs")
    cudnn.benchmark = True
    n_batches = bench.warmup + bench.iters

    # ---- data (train_dino's pipeline with --data_path, else the same synthetic batch every iteration)
    if bench.data_path:
        dataset, loader = main_dino.build_data(args)
        loader.sampler.set_epoch(bench.epoch)
        data_desc = (f"{bench.data_path} ({len(dataset)} images) via main_dino.build_data, "
                     f"{args.num_workers} workers")
    else:
        labels = torch.zeros(bench.batch_size, dtype=torch.long)
        batch = (synthetic, labels, [""] * bench.batch_size)
        loader = [batch] * n_batches
        data_desc = "synthetic random tensors (same batch every iteration)"

    # ---- models, loss, optimizer, schedules: main_dino.build_training, as train_dino builds them
    torch.manual_seed(bench.seed)
    niter_per_ep = n_batches // args.grad_accum_steps
    run = main_dino.build_training(args, niter_per_ep)
    student, teacher, dino_loss, optimizer = run.student, run.teacher, run.dino_loss, run.optimizer
    autocast, precision = run.precision.autocast, run.precision.description
    rss_models = max_rss_mib()

    # ---- the real loop, timed
    timed = TimedLoader(loader, n_batches, device)
    dino_step = main_dino.dino_step(student, teacher, run.teacher_without_ddp, dino_loss)
    after_step = main_dino.ema_update(student, run.teacher_without_ddp, run.momentum_schedule)
    stats = engine.train_one_epoch(dino_step, student, optimizer, timed, run.lr_schedule, run.wd_schedule,
                                   bench.epoch, args, after_step=after_step, precision=run.precision)

    # ---- on a GPU, the same loop with the crops already there (the model's own speed), and the copy alone: each
    # measured step above copies the pinned crops to the GPU on the compute stream, as training does
    on_device = None
    if device.type == "cuda" and not bench.data_path:
        resident = [im.to(device) for im in synthetic]
        timed_resident = TimedLoader([(resident, labels, [""] * bench.batch_size)] * n_batches, n_batches, device)
        engine.train_one_epoch(dino_step, student, optimizer, timed_resident, run.lr_schedule, run.wd_schedule,
                               bench.epoch, args, after_step=after_step, precision=run.precision)
        copies = []
        for _ in range(10):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            [im.to(device, non_blocking=True) for im in synthetic]
            torch.cuda.synchronize(device)
            copies.append(time.perf_counter() - start)
        on_device = {"stamps": timed_resident.stamps, "copy_s": sorted(copies)[len(copies) // 2],
                     "copy_mb": sum(im.numel() * im.element_size() for im in synthetic) / 1e6}

    # ---- FLOPs of one forward + backward (outside the timed loop; restores the loss centre)
    images = [im.to(device, non_blocking=True) for im in synthetic]
    center = dino_loss.center.clone()

    def step():
        with autocast():
            with torch.no_grad():
                teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, bench.epoch)
        loss.backward()
    flops = count_step_flops(step, torch)
    dino_loss.center.copy_(center)
    optimizer.zero_grad(set_to_none=True)

    n_student = sum(p.numel() for p in student.parameters())
    return dict(
        desc=(f"engine.train_one_epoch (real loop); {precision}; our ViT (SDPA attention), "
              "AdamW(fused=True), foreach clip + EMA"),
        data=data_desc, stamps=timed.stamps, cpu_stamps=timed.cpu_stamps, on_device=on_device, flops=flops,
        params=n_student,
        rss_models=rss_models, loop_stats={k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})


# ----------------------------------------------------------------------------------------------------
# Child: official
# ----------------------------------------------------------------------------------------------------
def run_official(bench, device, torch, synthetic):
    ref = load_official()
    arch = bench.arch.replace("deit", "vit")  # as the official main_dino does
    if not hasattr(ref, arch):
        raise SystemExit(f"the official reference has no architecture {bench.arch!r} (vit_tiny/small/base only)")
    # the official defaults
    drop_path_rate, norm_last_layer, use_bn = 0.1, True, False
    lr, min_lr, warmup_epochs, epochs = 0.0005, 1e-6, 10, 100
    weight_decay, weight_decay_end, momentum_teacher = 0.04, 0.4, 0.996
    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs = 0.04, 0.04, 0
    clip_grad, freeze_last_layer = 3.0, 1
    n_batches = bench.warmup + bench.iters
    use_fp16 = device.type == "cuda"

    if bench.data_path:
        import augmentations
        from torchvision import datasets
        # the official recipe; augmentations.DataAugmentationDINO is the same transform list as the official one
        transform = augmentations.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), bench.local_crops_number,
                                                       bench.global_crops_size, bench.local_crops_size)
        dataset = datasets.ImageFolder(bench.data_path, transform=transform)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                                      seed=bench.seed)
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=bench.batch_size,
                                             num_workers=bench.num_workers, pin_memory=device.type == "cuda",
                                             drop_last=True)
        sampler.set_epoch(bench.epoch)
        data_desc = (f"{bench.data_path} ({len(dataset)} images) via torchvision ImageFolder + "
                     f"augmentations.DataAugmentationDINO (same recipe as the official class) + "
                     f"DistributedSampler DataLoader, {bench.num_workers} workers")
    else:
        loader = [(synthetic, torch.zeros(bench.batch_size, dtype=torch.long))] * n_batches
        data_desc = "synthetic random tensors (same batch every iteration)"

    torch.manual_seed(bench.seed)
    student = getattr(ref, arch)(patch_size=bench.patch_size, drop_path_rate=drop_path_rate)
    teacher = getattr(ref, arch)(patch_size=bench.patch_size)
    embed_dim = student.embed_dim
    student = ref.MultiCropWrapper(student, ref.DINOHead(embed_dim, bench.out_dim, use_bn=use_bn,
                                                         norm_last_layer=norm_last_layer))
    teacher = ref.MultiCropWrapper(teacher, ref.DINOHead(embed_dim, bench.out_dim, use_bn))
    student, teacher = student.to(device), teacher.to(device)
    teacher_without_ddp = teacher
    teacher_without_ddp.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = ref.DINOLoss(bench.out_dim, bench.local_crops_number + 2, warmup_teacher_temp, teacher_temp,
                             warmup_teacher_temp_epochs, epochs).to(device)
    params_groups = ref.get_params_groups(student)
    optimizer = torch.optim.AdamW(params_groups)  # to use with ViTs
    fp16_scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    niter_per_ep = n_batches
    lr_schedule = ref.cosine_scheduler(lr * bench.batch_size / 256., min_lr, epochs, niter_per_ep,
                                       warmup_epochs=warmup_epochs)
    wd_schedule = ref.cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_ep)
    momentum_schedule = ref.cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep)
    rss_models = max_rss_mib()

    def autocast():
        return torch.autocast("cuda", dtype=torch.float16, enabled=fp16_scaler is not None) \
            if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    # ---- the official train_one_epoch body (tests/official_dino.py; metric logger left out)
    epoch = bench.epoch
    timed = TimedLoader(loader, n_batches, device)
    losses = ref.train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, timed, optimizer, lr_schedule,
                                 wd_schedule, momentum_schedule, epoch, fp16_scaler, clip_grad, freeze_last_layer,
                                 device)

    images = [im.to(device, non_blocking=True) for im in synthetic]
    center = dino_loss.center.clone()

    def step():
        with autocast():
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        optimizer.zero_grad()
        loss.backward()
    flops = count_step_flops(step, torch)
    dino_loss.center = center
    optimizer.zero_grad()

    precision = "fp16 autocast + GradScaler" if use_fp16 else "fp32 (CPU)"
    n_student = sum(p.numel() for p in student.parameters())
    return dict(
        desc=(f"official loop (tests/official_dino.py modules); {precision}; explicit-softmax ViT, "
              "weight_norm head, torch.optim.AdamW defaults, per-param clip + Python-loop EMA; "
              "no DDP wrapper (needs a process group)"),
        data=data_desc, stamps=timed.stamps, cpu_stamps=timed.cpu_stamps, flops=flops, params=n_student,
        rss_models=rss_models, loop_stats={"loss_last": losses[-1] if losses else float("nan")})


def child_main(bench) -> None:
    import torch
    if bench.threads:
        torch.set_num_threads(bench.threads)
    rss_imports = max_rss_mib()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    synthetic = synthetic_batch(bench, torch)
    runner = run_ours if bench._child == "ours" else run_official
    res = runner(bench, device, torch, synthetic)
    stamps, cpu_stamps = res.pop("stamps"), res.pop("cpu_stamps")
    on_device = res.pop("on_device", None)
    if on_device:
        s = on_device.pop("stamps")
        res.update(iter_times_on_device=[b - a for a, b in zip(s, s[1:])], copy_s=on_device["copy_s"],
                   copy_mb=on_device["copy_mb"])
    res.update(
        impl=bench._child, threads=torch.get_num_threads(), device=str(device),
        iter_times=[b - a for a, b in zip(stamps, stamps[1:])],
        iter_cpu_times=[b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])],
        rss_imports=rss_imports, rss_peak=max_rss_mib(),
        cuda_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        loadavg=loadavg())
    print(RESULT_MARKER + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------
def run_child(impl: str):
    cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--_child", impl]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            bufsize=1)
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        else:
            print(f"    | {line.rstrip()}", flush=True)
    rc = proc.wait()
    if rc != 0 or result is None:
        print(f"  {impl}: FAILED (exit code {rc})", flush=True)
        return None
    return result


def report(res, bench):
    """Print one run's figures; return (median, min) s/iteration over the timed iterations."""
    times = res["iter_times"]
    timed = times[bench.warmup:]
    if not timed:
        print(f"  {res['impl']}: no timed iterations")
        return None
    med, best = statistics.median(timed), min(timed)
    flops = res["flops"]
    print(f"  {res['impl']}: {res['desc']}")
    print(f"    data:                {res['data']}")
    print(f"    device / threads:    {res['device']} / {res['threads']}")
    print(f"    student parameters:  {res['params'] / 1e6:.2f} M")
    print("    iteration times (s): " + " ".join(f"{t:.3f}" for t in times)
          + f"   (first {bench.warmup} = warmup, discarded)")
    print(f"    median s/iteration:  {med:.4f}   (mean {statistics.mean(timed):.4f}, min {min(timed):.4f}, "
          f"max {max(timed):.4f}, n={len(timed)})")
    print(f"    images/s:            {bench.batch_size / med:.2f}")
    cpu = res["iter_cpu_times"][bench.warmup:]
    print(f"    CPU time / wall:     {sum(cpu) / sum(timed):.2f} over the timed iterations (this process's "
          f"threads; {res['threads']} = all threads busy, spin-waits included; less = waiting for data or "
          "for cores taken by other processes)")
    print(f"    FLOPs per image:     {flops / bench.batch_size / 1e9:.2f} GFLOP (forward + backward of one "
          f"step, teacher included, fused attention counted as explicit; "
          f"{flops / 1e9:.1f} GFLOP per step)")
    print(f"    achieved:            {flops / med / 1e9:.1f} GFLOP/s at the median ({flops / best / 1e9:.1f} at "
          "the fastest iteration)")
    peak = bench.peak_tflops or (peak_tflops(res["device_name"]) if res["device"].startswith("cuda") else None)
    if peak:
        print(f"    MFU:                 {100 * flops / med / 1e12 / peak:.1f}% of {peak:.0f} TFLOP/s (dense bf16 peak "
              f"of {res['device_name']}; {100 * flops / best / 1e12 / peak:.1f}% at the fastest iteration)")
    elif res["device"].startswith("cuda"):
        print(f"    MFU:                 n/a ({res['device_name']} is not in PEAK_TFLOPS: give --peak_tflops)")
    if res.get("iter_times_on_device"):
        med_dev = statistics.median(res["iter_times_on_device"][bench.warmup:])
        mfu_dev = f", MFU {100 * flops / med_dev / 1e12 / peak:.1f}%" if peak else ""
        print(f"    crops already on GPU: {med_dev:.4f} s/iteration, {bench.batch_size / med_dev:.2f} images/s"
              f"{mfu_dev} (the model's own speed; the figures above include the copy, as training does)")
        print(f"    host->GPU copy:      {1000 * res['copy_s']:.1f} ms for {res['copy_mb']:.0f} MB of pinned crops "
              f"({100 * res['copy_s'] / med:.0f}% of a step; the step difference is {1000 * (med - med_dev):.1f} ms)")
    mem = f"{res['rss_peak']:.0f} MiB peak RSS (after imports {res['rss_imports']:.0f}, after model build " \
          f"{res['rss_models']:.0f})"
    if res.get("cuda_peak_mib") is not None:
        mem += f"; CUDA max allocated {res['cuda_peak_mib']:.0f} MiB"
    print(f"    memory:              {mem}")
    if bench.data_path and bench.num_workers > 0:
        print("                         (main process only; data workers not included)")
    if res.get("loop_stats"):
        print("    loop stats:          " + ", ".join(f"{k}={v:.4g}" for k, v in res["loop_stats"].items()))
    print(f"    load average after:  {res['loadavg']}")
    return med, best


def summary_record(res, bench, med: float) -> dict:
    """The figures of one run, for --json."""
    peak = bench.peak_tflops or (peak_tflops(res["device_name"]) if res["device"].startswith("cuda") else None)
    tflops = res["flops"] / med / 1e12
    return {"impl": res["impl"], "desc": res["desc"], "device": res["device"], "device_name": res["device_name"],
            "s_per_iter": med, "images_per_s": bench.batch_size / med,
            "flops_per_image": res["flops"] / bench.batch_size,
            "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
            "cuda_peak_mib": res.get("cuda_peak_mib"), "rss_peak_mib": res["rss_peak"],
            **on_device_record(res, bench, peak)}


def on_device_record(res, bench, peak) -> dict:
    """The step with the crops already on the GPU and the copy alone (GPU runs of `ours` only)."""
    if not res.get("iter_times_on_device"):
        return {}
    med = statistics.median(res["iter_times_on_device"][bench.warmup:])
    tflops = res["flops"] / med / 1e12
    return {"s_per_iter_on_device": med, "images_per_s_on_device": bench.batch_size / med,
            "mfu_on_device": tflops / peak if peak else None, "copy_s": res["copy_s"], "copy_mb": res["copy_mb"]}


def main() -> None:
    bench = get_parser().parse_args()
    if bench._child:
        child_main(bench)
        return
    import torch
    if bench.threads:
        torch.set_num_threads(bench.threads)
    print("# DINO training-step benchmark (benchmarks/bench_train.py)")
    script = os.path.relpath(os.path.abspath(__file__), REPO_ROOT)
    print(f"command:      python {' '.join(shlex.quote(a) for a in [script] + sys.argv[1:])}")
    print(f"date:         {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"git:          {git_sha()}")
    print(f"python/torch: {platform.python_version()} / torch {torch.__version__}")
    print(f"CPU:          {cpu_model()} ({os.cpu_count()} logical CPUs)")
    if torch.cuda.is_available():
        print(f"GPU:          {torch.cuda.get_device_name(0)}")
    print(f"threads:      {torch.get_num_threads()} ({'--threads' if bench.threads else 'torch default'})")
    print(f"load average: {loadavg()} (1/5/15 min, before)")
    print(f"setup:        arch {bench.arch}/{bench.patch_size}, batch {bench.batch_size}, "
          f"2x{bench.global_crops_size}px + {bench.local_crops_number}x{bench.local_crops_size}px crops, "
          f"out_dim {bench.out_dim}, epoch index {bench.epoch}, {bench.warmup} warmup + {bench.iters} timed "
          f"iterations x {max(1, bench.repeats)} run(s), data: "
          + (f"{bench.data_path} ({bench.num_workers} workers)" if bench.data_path else "synthetic tensors"))
    print(flush=True)
    impls = ["ours", "official"] if bench.impl == "both" else [bench.impl]
    medians = {impl: [] for impl in impls}
    records = {}
    bests = {impl: [] for impl in impls}
    for r in range(max(1, bench.repeats)):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            run_name = impl if bench.repeats <= 1 else f"{impl} (run {r + 1}/{bench.repeats})"
            print(f"[{run_name}] running in a fresh subprocess ...", flush=True)
            res = run_child(impl)
            if res is not None:
                print()
                figures = report(res, bench)
                if figures is not None:
                    medians[impl].append(figures[0])
                    bests[impl].append(figures[1])
                    records.setdefault(impl, []).append(summary_record(res, bench, figures[0]))
            print(flush=True)
    summary = {impl: statistics.median(m) for impl, m in medians.items() if m}
    if bench.repeats > 1:
        for impl, m in medians.items():
            if m:
                print(f"{impl}: median of {len(m)} runs {summary[impl]:.4f} s/iteration "
                      f"({bench.batch_size / summary[impl]:.2f} images/s); runs: "
                      + " ".join(f"{x:.4f}" for x in m))
    if "ours" in summary and "official" in summary:
        print(f"speed-up ours/official (official median time / ours): "
              f"{summary['official'] / summary['ours']:.2f}x ({bench.batch_size / summary['ours']:.2f} vs "
              f"{bench.batch_size / summary['official']:.2f} images/s)")
        best_ours, best_official = min(bests["ours"]), min(bests["official"])
        print(f"speed-up ours/official at the fastest iterations (least disturbed by other load): "
              f"{best_official / best_ours:.2f}x ({best_ours:.4f} vs {best_official:.4f} s/iteration)")
    print(f"load average: {loadavg()} (after)")
    if bench.json:
        out = {}
        for impl, runs in records.items():  # the run closest to the median of the medians
            out[impl] = min(runs, key=lambda r: abs(r["s_per_iter"] - summary[impl]))
        if "ours" in summary and "official" in summary:
            out["speedup"] = summary["official"] / summary["ours"]
        out["setup"] = {k: v for k, v in vars(bench).items() if not k.startswith("_")}
        with open(bench.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
