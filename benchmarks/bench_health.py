# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Cost of the training-health signals (health.py) next to one training step of the README quickstart
configuration (vit_tiny/16, 2 x 64 px global + 4 x 32 px local crops, out_dim 4096, 64 images per batch, fp32).

    python benchmarks/bench_health.py                    # CPU, one thread (the figure of the 2% budget)
    python benchmarks/bench_health.py --threads 2 --repeats 30

A step is what main_dino.dino_step and engine.train_one_epoch run: teacher forward on the 2 global crops,
student forward on all crops, DINO loss, backward, AdamW step, teacher EMA. The signals are what dino_step adds:
the teacher's log-probabilities with the centre, `dino_signals` (entropy, prototypes in use, KL, feature
spread), the hook that keeps the teacher's backbone features and the collapse detector's reading of them (every
step on CPU). RankMe, once per epoch, is timed apart (the backbone on --probe_size images, the singular values)
and compared with an epoch of --steps_per_epoch steps. Both are timed interleaved (the machine is
often shared), `--repeats` times after `--warmup` untimed ones; the medians and their ratio are printed.
Prints figures; asserts nothing.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones  # noqa: E402
import health  # noqa: E402
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402
from losses import DINOLoss  # noqa: E402


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    student, dim = backbones.build_backbone(args.arch, args.patch_size, 0.1)
    teacher, _ = backbones.build_backbone(args.arch, args.patch_size)
    student = utils.MultiCropWrapper(student, vits.DINOHead(dim, args.out_dim)).to(device)
    teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(dim, args.out_dim)).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ncrops = 2 + args.local_crops_number
    loss_fn = DINOLoss(args.out_dim, ncrops, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=1e-4)
    catcher = health.InputCatcher(teacher.head)
    b = args.batch_size
    crops = [torch.randn(b, 3, args.global_crops_size, args.global_crops_size, device=device) for _ in range(2)]
    crops += [torch.randn(b, 3, args.local_crops_size, args.local_crops_size, device=device)
              for _ in range(args.local_crops_number)]
    s_params, t_params = list(student.parameters()), list(teacher.parameters())

    def step():
        with torch.no_grad():
            t_out = teacher(crops[:2])
        s_out = student(crops)
        loss = loss_fn(s_out, t_out, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(t_params, 0.996)
            torch._foreach_add_(t_params, s_params, alpha=0.004)
        return t_out, loss.detach()

    detector = health.CollapseDetector(warmup=0, window=10 ** 9)

    def signals(t_out, loss):
        logp = health.teacher_log_probs(t_out, loss_fn.center, 0.04)
        values = health.dino_signals(logp, loss, catcher.value)
        detector.observe(0, values)  # on CPU it reads the values every step
        return values

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_times, signal_times = [], []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        t_out, loss = step()
        sync()
        mid = time.perf_counter()
        for _ in range(args.signal_repeats):
            values = signals(t_out, loss)
        sync()
        end = time.perf_counter()
        if i >= args.warmup:
            step_times.append(mid - start)
            signal_times.append((end - mid) / args.signal_repeats)
    step_t, signal_t = statistics.median(step_times), statistics.median(signal_times)
    print(f"config: {args.arch}/{args.patch_size}, {b} images, 2 x {args.global_crops_size} + "
          f"{args.local_crops_number} x {args.local_crops_size} px crops, out_dim {args.out_dim}, {device}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"step (median of {args.repeats}): {step_t * 1e3:.1f} ms")
    print(f"health signals (median): {signal_t * 1e3:.3f} ms = {100 * signal_t / step_t:.3f}% of a step")
    print("signals:", {k: round(float(v), 4) for k, v in values.items()})

    # RankMe once per epoch: the teacher backbone on the probe images (eval crops) and the singular values
    probe = torch.randn(args.probe_size, 3, args.global_crops_size, args.global_crops_size, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        features = torch.cat([teacher.backbone(x) for x in probe.split(b)])
    value = health.rankme(features)
    rankme_t = time.perf_counter() - start
    epoch_t = step_t * args.steps_per_epoch
    print(f"RankMe on {args.probe_size} probe images: {rankme_t:.2f} s = {100 * rankme_t / epoch_t:.2f}% of an epoch "
          f"of {args.steps_per_epoch} steps (value {value:.1f} at initialisation)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Cost of the training-health signals against a training step")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--global_crops_size", default=64, type=int)
    parser.add_argument("--local_crops_size", default=32, type=int)
    parser.add_argument("--local_crops_number", default=4, type=int)
    parser.add_argument("--out_dim", default=4096, type=int)
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=1, type=int)
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--repeats", default=10, type=int)
    parser.add_argument("--signal_repeats", default=5, type=int, help="signal computations per step (averaged)")
    parser.add_argument("--probe_size", default=1024, type=int, help="RankMe probe images")
    parser.add_argument("--steps_per_epoch", default=46, type=int, help="(quickstart: 3,000 images / 64)")
    main(parser.parse_args())
