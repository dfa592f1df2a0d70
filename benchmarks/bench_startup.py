# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Where a short main_dino.py run spends its time, phase by phase: imports, data listing, model building, the
crop-size check, the training steps, the epoch-end evaluation (RankMe probe, online k-NN), checkpoints and
curves, and what is left (process start and exit). Prints the table; asserts nothing.

    .venv/bin/python benchmarks/bench_startup.py [--iters 8] [--amp_dtype bf16] [--repeats 2]

The run: ViT-Tiny/16, 2 x 224 + 8 x 96 crops, batch 16, one epoch of `--iters` iterations on a folder of
16 x iters images (the quickstart's shapes), as `python main_dino.py ...` runs it, in a fresh process each time.
Each phase is timed by wrapping the function that does it (the wrappers cost microseconds).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "BENCH_STARTUP_RESULT "


def child(argv) -> None:
    """Run main_dino.py's main under timers; print the phases as one JSON line."""
    t_start = time.perf_counter()
    sys.path.insert(0, REPO_ROOT)
    phases = {}

    def timed(module, name: str, phase: str) -> None:
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        setattr(module, name, wrapper)

    import main_dino  # everything the script imports
    phases["imports"] = time.perf_counter() - t_start
    import backbones
    import engine
    import health
    import runtime
    import tracking
    timed(main_dino, "build_data", "data listing and loader")
    timed(main_dino, "build_training", "models, loss, optimizer, schedules")
    timed(backbones, "check_input_sizes", "crop-size check")
    timed(engine, "train_one_epoch", "training steps (the epoch)")
    timed(health, "probe_rankme", "RankMe probe (epoch end)")
    timed(engine.Run, "checkpoint", "checkpoints")
    timed(tracking, "plot_training_curves", "training curves (PNG)")
    timed(engine.Run, "resume", "resume check")
    timed(runtime, "setup_run", "run set-up (seeds, output folder)")
    args = main_dino.get_args_parser().parse_args(argv)
    start = time.perf_counter()
    main_dino.train_dino(args)
    phases["main (all of train_dino)"] = time.perf_counter() - start
    phases["in-process total"] = time.perf_counter() - t_start
    print(MARKER + json.dumps(phases), flush=True)


def official_child(official_dir: str, argv) -> None:
    """The official main_dino.py (a checkout of facebookresearch/dino) on the CPU: it needs CUDA and NCCL, so a
    one-process gloo group stands in for NCCL and `.cuda()`, `set_device` and `synchronize` do nothing; its
    parser's torch.hub.list of XCiT models (a GitHub request) returns nothing. The rest is the official code as it
    is (fp32: run it with --use_fp16 false)."""
    import runpy
    import socket

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    sys.path.insert(0, official_dir)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.hub.list = lambda *a, **k: []  # its parser lists XCiT models from GitHub: no network here, and not timed
    init_process_group = dist.init_process_group
    dist.init_process_group = lambda *a, **k: init_process_group(**{**k, "backend": "gloo"})
    ddp = nn.parallel.DistributedDataParallel
    nn.parallel.DistributedDataParallel = lambda module, device_ids=None, **k: ddp(module, **k)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import utils as official_utils  # the official utils.py: its SmoothedValue all-reduces a CUDA tensor

    def synchronize_between_processes(self):
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0]), t[1].item()
    official_utils.SmoothedValue.synchronize_between_processes = synchronize_between_processes
    sys.argv = ["main_dino.py", *argv]
    runpy.run_path(os.path.join(official_dir, "main_dino.py"), run_name="__main__")


def whole_command(cmd, cwd: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def main() -> None:
    if sys.argv[1:2] == ["--_child"]:  # every flag after it is main_dino.py's
        child(sys.argv[2:])
        return
    if sys.argv[1:2] == ["--_official"]:  # then the official checkout, then main_dino.py's flags
        official_child(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", default=8, type=int)
    p.add_argument("--amp_dtype", default="bf16")
    p.add_argument("--repeats", default=2, type=int)
    p.add_argument("--extra", default="", help="more main_dino.py flags, e.g. '--health_probe_size 0'")
    p.add_argument("--official_dir", default=None, help="""a checkout of facebookresearch/dino: also time its
        main_dino.py (fp32, on the CPU through a one-process gloo group) as a whole command, alternating with
        ours (the same flags; ours with --amp_dtype), for the whole-run ratio""")
    args = p.parse_args()
    sys.path.insert(0, REPO_ROOT)
    import synthetic
    root = synthetic.make_synthetic_dataset()
    work = tempfile.mkdtemp(prefix="bench_startup_")
    images = os.path.join(work, "images", "shapes")
    os.makedirs(images)
    train = os.path.join(root, "train")
    files = sorted(os.path.join(d, f) for d in (os.path.join(train, c) for c in sorted(os.listdir(train)))
                   for f in sorted(os.listdir(d)))[::7][:16 * args.iters]
    for f in files:
        shutil.copy(f, images)
    flags = ["--data_path", os.path.join(work, "images"), "--arch", "vit_tiny", "--patch_size", "16",
             "--local_crops_number", "8",  # 224 and 96 px crops: the defaults (the official script has no flag)
             "--batch_size_per_gpu", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "2",
             "--amp_dtype", args.amp_dtype] + args.extra.split()
    print(f"# a short main_dino.py run, phase by phase: {len(files)} images, {args.iters} iterations, "
          f"flags: {' '.join(flags[2:])}")
    rows = []
    try:
        for r in range(args.repeats):
            out = os.path.join(work, f"out{r}")
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", *flags, "--output_dir", out]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"run {r} failed ({proc.returncode})")
            phases = json.loads(next(line for line in proc.stdout.splitlines()
                                     if line.startswith(MARKER))[len(MARKER):])
            phases["whole command (wall)"] = wall
            rows.append(phases)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    names = list(rows[0])
    print(f"{'phase':<40}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(rows))))
    for name in names:
        print(f"{name:<40}" + "".join(f"{row.get(name, 0.0):>10.2f}" for row in rows))
    for row in rows:
        timed_sum = sum(v for k, v in row.items() if k not in ("main (all of train_dino)", "in-process total",
                                                               "whole command (wall)", "imports"))
        row["other (in train_dino)"] = row["main (all of train_dino)"] - timed_sum
        row["process start and exit"] = row["whole command (wall)"] - row["in-process total"]
    for name in ("other (in train_dino)", "process start and exit"):
        print(f"{name:<40}" + "".join(f"{row[name]:>10.2f}" for row in rows))
    try:
        if args.official_dir:
            compare_with_official(args, flags, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare_with_official(args, flags, work: str) -> None:
    """The whole commands, ours (as a user runs it) and the official one, alternating, `--repeats` times each."""
    import statistics
    base = [f for f in flags if f not in ("--amp_dtype", args.amp_dtype)]
    ours, official = [], []
    for r in range(args.repeats):
        for name in (("ours", "official") if r % 2 == 0 else ("official", "ours")):
            out = os.path.join(work, f"{name}{r}")
            if name == "ours":
                cmd = [sys.executable, os.path.join(REPO_ROOT, "main_dino.py"), *flags, "--output_dir", out]
                ours.append(whole_command(cmd, REPO_ROOT))
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--_official", os.path.abspath(args.official_dir),
                       *base, "--use_fp16", "false", "--output_dir", out]
                official.append(whole_command(cmd, args.official_dir))
    a, b = statistics.median(ours), statistics.median(official)
    print(f"\nwhole command, median of {args.repeats}: ours ({args.amp_dtype}) {a:.1f} s "
          f"({', '.join(f'{x:.1f}' for x in ours)}), official fp32 {b:.1f} s ({', '.join(f'{x:.1f}' for x in official)})"
          f": ours is {b / a:.2f}x the official speed")


if __name__ == "__main__":
    main()
