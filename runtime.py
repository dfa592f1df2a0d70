# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The training loop shared by main_dino.py and main_distill.py, so that both get the same resume, logs,
checkpoints, mixed precision and checks from one piece of code.

- `train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch, args, ...)`: the
  optimizer steps of one epoch: schedules, gradient accumulation, mixed precision, clipping, the frozen last
  layer, non-finite checks and metrics. What is specific to a method is `step(batch, epoch, it)`, the forward
  pass and loss, returning `(loss, {name: value})`, and `after_step(it)` (the teacher EMA of DINO), returning
  `{name: value}` to log.
- `fit(args, ...)`: the run around it: resume, the epochs, log.txt, checkpoints, online k-NN and curves.
- `StopSignals`: SIGTERM, SIGINT and SIGUSR2 (SLURM's pre-timeout and preemption signal) make every rank
  finish its iteration, agree on the same step, write a checkpoint of the exact position inside the epoch
  and stop (`utils.TrainingInterrupted`); the same command resumes at the next iteration with the same
  samples and augmentations, as if never stopped.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import eval_knn
import tracking
import utils

StepFn = Callable[[Any, int, int], Tuple[torch.Tensor, Dict[str, Any]]]


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested list/tuple) batch moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def ddp_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict with the `module.` prefix of a DDP-wrapped model, wrapped or not (official key format)."""
    state = model.state_dict()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return state
    return {"module." + k: v for k, v in state.items()}


def plain_args(args: argparse.Namespace) -> Dict:
    """The flags as a plain dict (weights_only-loadable)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
    return out


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(10, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def setup_run(args: argparse.Namespace) -> None:
    """What every training script does first: processes, seeds, data workers, the flags in the log, and a
    writable output folder (checked before any training)."""
    utils.init_distributed_mode(args)
    per_rank = {"rank", "gpu", "local_rank", "device", "dist_url"}
    utils.check_same_on_all_ranks({k: str(v) for k, v in vars(args).items() if k not in per_rank}, "their flags")
    utils.fix_random_seeds(args.seed + args.rank)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    print("git:\n  {}\n".format(utils.get_sha()))
    print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))
    torch.backends.cudnn.benchmark = True
    if utils.is_main_process():
        utils.check_output_dir(args.output_dir)


def steps_per_epoch(dataset, data_loader, args: argparse.Namespace) -> int:
    """Optimizer steps per epoch; stops with a message when the data cannot fill one."""
    utils.check_same_on_all_ranks({"images": len(dataset), "classes": len(dataset.base.classes)}, "the dataset")
    niter_per_ep = len(data_loader) // args.grad_accum_steps
    if niter_per_ep == 0:
        raise utils.UserError(
            f"{len(dataset)} images are not enough for one step of {args.batch_size_per_gpu} images x "
            f"{args.world_size} processes x {args.grad_accum_steps} accumulation steps: lower "
            "--batch_size_per_gpu or --grad_accum_steps, or use more data")
    print(f"Data loaded: there are {len(dataset)} images ({len(dataset.base.classes)} classes), "
          f"{niter_per_ep} optimizer steps per epoch.")
    return niter_per_ep


NONFINITE_ADVICE = ("Try a lower --lr, a longer --warmup_epochs, fp32 (--use_fp16 false), a larger "
                    "--freeze_last_layer, gradient clipping (--clip_grad 0.3), or a lower --teacher_temp; "
                    "--skip_nonfinite N skips up to N such steps instead of stopping.")


def check_finite(loss: torch.Tensor, epoch: int, it: int, args, all_finite: Optional[torch.Tensor] = None) -> None:
    """Stop on a non-finite loss. On GPU the check is deferred (`all_finite` accumulates on the device) so
    that no step waits for the host; then the bad iteration is only known to be at or before `it`."""
    finite = bool(all_finite) if all_finite is not None else math.isfinite(loss.item())
    if finite:
        return
    value = loss.item()
    where = f"iteration {it}" if not math.isfinite(value) else f"an iteration up to {it}"
    raise utils.UserError(
        f"Loss is {value if not math.isfinite(value) else 'not finite'} at epoch {epoch}, {where}: stopping "
        f"training. The last good checkpoint ({os.path.join(args.output_dir, 'checkpoint.pth')}, if any) is "
        f"untouched and the run resumes from it. {NONFINITE_ADVICE}")


def finite_step(student: nn.Module, loss: torch.Tensor, epoch: int, it: int, args) -> bool:
    """--skip_nonfinite N: whether this step's gradients (all-reduced, so the same on every rank) and loss are
    finite; a non-finite step is skipped (one host-device synchronisation per step, only in this mode) and
    counted in `args.nonfinite_skipped`; the run stops at the (N+1)-th."""
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    finite = torch.isfinite(loss).to(torch.float32)
    if grads:
        finite = finite * torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).to(finite.device)
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # the loss may be non-finite on one rank only
    if bool(finite):
        return True
    args.nonfinite_skipped = getattr(args, "nonfinite_skipped", 0) + 1
    if args.nonfinite_skipped > args.skip_nonfinite:
        raise utils.UserError(
            f"Non-finite loss or gradients at epoch {epoch}, iteration {it}, after {args.skip_nonfinite} skipped "
            f"step(s) (--skip_nonfinite): stopping training. The last good checkpoint "
            f"({os.path.join(args.output_dir, 'checkpoint.pth')}, if any) is untouched. {NONFINITE_ADVICE}")
    print(f"WARNING: non-finite loss or gradients at epoch {epoch}, iteration {it}: step skipped "
          f"({args.nonfinite_skipped} of at most {args.skip_nonfinite})")
    return False


class StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR2 into a request to stop after the current iteration.

    A context manager: handlers are installed on entry (main thread only) and the previous ones restored
    on exit. `agreed()` tells, on every rank at the same iteration, whether any rank received one (a small
    all-reduce on the CPU; signals reach the ranks at slightly different moments). A second Ctrl-C stops
    at once.
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self, world_size: int = 1):
        self.signum = 0
        self.previous: Dict[int, Any] = {}
        self.group = None
        if world_size > 1:  # a CPU group for the flag, so that checking it never waits for a GPU
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handler(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        if not self.signum:
            utils.print_all_ranks(f"Received {signal.Signals(signum).name}: finishing this iteration, then "
                                  "writing a checkpoint and stopping (Ctrl-C again to stop at once).")
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank received (0 if none), the same on every rank."""
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def interrupted(self, signum: int, where: str, checkpoint_path: str) -> utils.TrainingInterrupted:
        return utils.TrainingInterrupted(
            signum, f"Stopped by {signal.Signals(signum).name} {where}; the checkpoint {checkpoint_path} holds "
            "this exact position: run the same command again to resume there.", self.previous.get(signum))


def train_one_epoch(step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                    lr_schedule: Sequence[float], wd_schedule: Sequence[float], epoch: int, args,
                    fp16_scaler: Optional[torch.amp.GradScaler] = None, autocast=contextlib.nullcontext,
                    bad_images: Optional[data.BadImageTracker] = None,
                    after_step: Optional[Callable[[int], Dict[str, Any]]] = None,
                    position: Optional[Dict[str, Any]] = None,
                    between_steps: Optional[Callable[[int, Callable[[], Dict]], None]] = None,
                    tracker: Optional[tracking.Tracker] = None) -> Dict[str, float]:
    """One epoch of optimizer steps on `student` (the trained module, DDP-wrapped or not); returns the epoch
    averages of the loss, of what `step` and `after_step` return, of lr and wd, and images/s.

    `data_loader` yields `(batch, labels, bad)`; `bad` holds one unreadable-image report per sample ("" if
    none). `args` gives grad_accum_steps, clip_grad, freeze_last_layer, epochs, print_freq,
    batch_size_per_gpu, world_size, device and output_dir.

    Mid-epoch resume: `position` (this rank's, from `between_steps`) continues an epoch after its first
    `position["batches"]` batches, which the loader must already skip (`EpochSampler.set_epoch(epoch,
    start)`). `between_steps(it, position_fn)` runs after every optimizer step; `position_fn()` checks that
    the state is finite and returns this rank's position, for a checkpoint. `tracker` gets the metrics of
    every --log_freq-th step (log_iters.jsonl, TensorBoard, W&B).
    """
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = 'Epoch: [{}/{}]'.format(epoch, args.epochs)
    accum = args.grad_accum_steps
    niter_per_ep = len(data_loader) // accum
    check_every_step = args.device.type == "cpu"  # reading the loss costs nothing there
    skip_nonfinite = getattr(args, "skip_nonfinite", 0) > 0
    all_finite = torch.ones((), dtype=torch.bool, device=args.device)
    images_per_iter = args.batch_size_per_gpu * args.world_size
    epoch_start, n_images, elapsed_before, start_batch = time.time(), 0, 0.0, 0
    if position:
        start_batch, n_images, elapsed_before = position["batches"], position["n_images"], position["elapsed"]
        metric_logger.load_state_dict(position["meters"])
        if bad_images is not None:
            bad_images.seen.update(position["bad_images"])
        print(f"Resuming epoch {epoch} at batch {start_batch} of {len(data_loader)}")

    def position_fn() -> Dict[str, Any]:
        if not skip_nonfinite:
            check_finite(loss, epoch, it_local, args, None if check_every_step else all_finite)
        return {"batches": it_local + 1, "n_images": n_images, "meters": metric_logger.state_dict(),
                "elapsed": elapsed_before + time.time() - epoch_start,
                "bad_images": dict(bad_images.seen) if bad_images is not None else {}}

    it_local = start_batch - 1
    loss = step_loss = torch.zeros(())
    for it_local, (batch, _, bad) in enumerate(metric_logger.log_every(
            tracker.timed(data_loader) if tracker else data_loader, args.print_freq, header,
            images_per_iter=images_per_iter, start=start_batch),
            start=start_batch):
        step_in_epoch, micro = divmod(it_local, accum)
        if step_in_epoch >= niter_per_ep:
            break  # the last incomplete accumulation
        it = niter_per_ep * epoch + step_in_epoch  # global training iteration (optimizer steps)
        if bad_images is not None and any(bad):
            bad_images.update([b for b in bad if b])
        if micro == 0:
            for i, param_group in enumerate(optimizer.param_groups):
                param_group["lr"] = float(lr_schedule[it])
                if i == 0:  # only the first group is regularized
                    param_group["weight_decay"] = float(wd_schedule[it])

        batch = to_device(batch, args.device)
        last_micro = micro == accum - 1
        # no gradient all-reduce until the last micro-batch of an accumulation
        sync = contextlib.nullcontext() if last_micro or not hasattr(student, "no_sync") else student.no_sync()
        with sync:
            with autocast():
                loss, terms = step(batch, epoch, it)
            if fp16_scaler is None:
                (loss / accum).backward()
            else:
                fp16_scaler.scale(loss / accum).backward()
        loss = loss.detach()
        step_loss = loss if micro == 0 else step_loss + loss
        n_images += len(bad)
        if skip_nonfinite:
            pass  # decided on the whole step below
        elif check_every_step:
            check_finite(loss, epoch, it_local, args)
        else:
            all_finite &= torch.isfinite(loss)
            if it_local % args.print_freq == 0:
                check_finite(loss, epoch, it_local, args, all_finite)
        if not last_micro:
            metric_logger.update(loss=loss, **terms)
            continue
        if skip_nonfinite and not finite_step(student, step_loss, epoch, it, args):
            optimizer.zero_grad(set_to_none=True)
            if fp16_scaler is not None:
                fp16_scaler.update()
            continue  # the step is not applied (no update, no EMA)
        metric_logger.update(loss=loss, **terms)

        # student update
        if fp16_scaler is not None and args.clip_grad:
            fp16_scaler.unscale_(optimizer)  # unscale the gradients of optimizer's params
        norms = utils.clip_gradients(student, args.clip_grad) if args.clip_grad else None
        log_now = tracker is not None and tracker.wants(it)
        if log_now and norms is None:
            norms = tracking.grad_norms(student, fp16_scaler)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        if fp16_scaler is None:
            optimizer.step()
        else:
            fp16_scaler.step(optimizer)
            fp16_scaler.update()
        optimizer.zero_grad(set_to_none=True)
        after = after_step(it) if after_step is not None else {}
        metric_logger.update(**after)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        metric_logger.update(wd=optimizer.param_groups[0]["weight_decay"])
        if log_now:
            group = optimizer.param_groups[0]
            tracker.log_iteration(it, {"loss": step_loss / accum, **terms, **after, "lr": group["lr"],
                                       "wd": group["weight_decay"]}, grad_norms=norms)
        if between_steps is not None and step_in_epoch + 1 < niter_per_ep:
            between_steps(it, position_fn)
    if not skip_nonfinite:
        check_finite(loss, epoch, it_local, args, all_finite)

    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    epoch_time = elapsed_before + time.time() - epoch_start
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    n_images_total = n_images * args.world_size
    n_bad = bad_images.count if bad_images is not None else 0
    if utils.is_dist_avail_and_initialized():
        t = torch.tensor([n_bad], dtype=torch.float64, device=args.device)
        dist.all_reduce(t)
        n_bad = int(t.item())
    stats.update(images_per_sec=n_images_total / epoch_time, epoch_time=epoch_time, bad_images=n_bad)
    print("Averaged stats:", metric_logger)
    return stats


# ----------------------------------------------------------------------------------------------------
# Online k-NN
# ----------------------------------------------------------------------------------------------------
def add_knn_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--knn_data_path', default='', type=str, help="""Online k-NN: a folder with train/ and
        val/ ImageFolder trees (a subset is fine), or "synthetic". The 20-NN accuracy of the evaluated backbone
        (DINO: the teacher; distillation: the student) is logged as knn_top1/knn_top5 in log.txt. Empty: none.""")
    parser.add_argument('--knn_eval_freq', default=1, type=int, help="""Run the online k-NN every x epochs
        (and after the last one).""")
    parser.add_argument('--knn_resize_size', default=None, type=int, help="""Online k-NN: resize of the short
        side (default: 256/224 of --knn_crop_size).""")
    parser.add_argument('--knn_crop_size', default=None, type=int, help="""Online k-NN: center-crop size
        (default: --global_crops_size).""")


def build_knn_data(args: argparse.Namespace):
    """The train/val datasets of the online k-NN (None without --knn_data_path), checked before training."""
    if not args.knn_data_path:
        return None
    crop = args.knn_crop_size or args.global_crops_size
    resize = args.knn_resize_size or int(round(crop * 256 / 224))
    train, val = eval_knn.split_datasets(args.knn_data_path, resize, crop)
    print(f"Online k-NN every {args.knn_eval_freq} epoch(s) on {args.knn_data_path}: {len(train)} train and "
          f"{len(val)} val images, resize {resize}, crop {crop}.")
    return train, val


def online_knn(backbone: nn.Module, knn_datasets, args: argparse.Namespace, autocast, who: str) -> Dict[str, float]:
    """20-NN accuracy of `backbone`, with eval_knn.py's code; {knn_top1, knn_top5, knn_time}."""
    start = time.time()
    was_training = backbone.training
    backbone.eval()  # batch norms use their running statistics, as in eval_knn.py
    with autocast():
        train_f, train_l, test_f, test_l = eval_knn.compute_features(
            backbone, *knn_datasets, args.batch_size_per_gpu, args.num_workers, args.device)
    backbone.train(was_training)
    top1, top5 = eval_knn.knn_accuracy(train_f.float(), train_l, test_f.float(), test_l, k=20, T=0.07)
    print(f"Online 20-NN of the {who}: top-1 {top1:.2f}%, top-5 {top5:.2f}% ({time.time() - start:.0f} s)")
    return {"knn_top1": top1, "knn_top5": top5, "knn_time": time.time() - start}


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def fit(args: argparse.Namespace, *, step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer,
        data_loader, lr_schedule, wd_schedule, state: Dict[str, Any], autocast=contextlib.nullcontext,
        fp16_scaler: Optional[torch.amp.GradScaler] = None, after_step: Optional[Callable[[int], Dict]] = None,
        bad_images: Optional[data.BadImageTracker] = None, knn_datasets=None,
        knn_backbone: Optional[nn.Module] = None, knn_who: str = "teacher",
        extra_checkpoint: Optional[Dict[str, Any]] = None,
        check_checkpoint: Optional[Callable[[dict], None]] = None) -> None:
    """Train `student` for the epochs left, resuming from output_dir/checkpoint.pth when it exists.

    `state`: everything else that a checkpoint restores, by name (modules, optimizer, losses with a centre,
    the scaler). The checkpoint also holds `epoch`, `args`, per-rank RNG states, the log history and
    `extra_checkpoint`; `check_checkpoint(checkpoint)` can refuse a checkpoint before anything is loaded.
    """
    # ============ optionally resume training ... ============
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    if utils.is_main_process():
        utils.remove_stale_temporaries(args.output_dir)
    to_restore = {"epoch": 0, "log_history": [], "position": None, "tracking": None, "nonfinite_skipped": 0}
    checkpoint = utils.restart_from_checkpoint(checkpoint_path, run_variables=to_restore, check=check_checkpoint,
                                               student=student, optimizer=optimizer, fp16_scaler=fp16_scaler,
                                               **state)
    start_epoch, log_history = to_restore["epoch"], list(to_restore["log_history"])
    position = to_restore["position"]  # set when the checkpoint was written inside an epoch
    args.nonfinite_skipped = to_restore["nonfinite_skipped"]  # --skip_nonfinite counts over the whole run
    log_path = os.path.join(args.output_dir, "log.txt")
    if checkpoint is not None:
        rng_states = checkpoint.get("rng_states") or []
        if len(rng_states) == args.world_size:
            utils.set_rng_state(rng_states[args.rank])
        if "log_history" in checkpoint:
            utils.sync_log_with_checkpoint(log_path, log_history)
        del checkpoint
    else:
        utils.sync_log_with_checkpoint(log_path, None)
    if position is not None:
        # the position counts batches of each rank's share: it means the same samples only with the same split
        saved = (len(position["ranks"]), position.get("batch_size_per_gpu", args.batch_size_per_gpu),
                 position.get("grad_accum_steps", args.grad_accum_steps))
        if saved != (args.world_size, args.batch_size_per_gpu, args.grad_accum_steps):
            raise utils.UserError(
                f"{checkpoint_path} was written in the middle of epoch {start_epoch} by {saved[0]} processes with "
                f"--batch_size_per_gpu {saved[1]} and --grad_accum_steps {saved[2]}; resume it with the same number "
                f"of processes (this run has {args.world_size}) and the same flags")
    niter_per_ep = len(data_loader) // args.grad_accum_steps
    tracker = tracking.Tracker(
        args, start_iteration=start_epoch * niter_per_ep + (position["batches"] // args.grad_accum_steps
                                                            if position is not None else 0),
        iters_per_epoch=niter_per_ep, images_per_batch=args.batch_size_per_gpu * args.world_size,
        state=to_restore["tracking"])

    def save_checkpoint(epochs_done: int, rank_position: Optional[Dict] = None) -> None:
        """checkpoint.pth after `epochs_done` epochs, plus, inside an epoch, every rank's position in it."""
        per_rank = [(utils.get_rng_state(), rank_position)]
        if args.world_size > 1:
            per_rank = [None] * args.world_size
            dist.all_gather_object(per_rank, (utils.get_rng_state(), rank_position))
        save_dict = {'student': ddp_state_dict(student)}
        save_dict.update({k: v.state_dict() for k, v in state.items() if v is not None})
        save_dict.update({'optimizer': optimizer.state_dict(), 'epoch': epochs_done, 'args': plain_args(args),
                          'rng_states': [r for r, _ in per_rank], 'log_history': log_history,
                          'tracking': tracker.state_dict(),
                          'nonfinite_skipped': args.nonfinite_skipped,
                          **(extra_checkpoint or {})})
        if rank_position is not None:
            save_dict['position'] = {"epoch": epochs_done, "batches": rank_position["batches"],
                                     "batch_size_per_gpu": args.batch_size_per_gpu,
                                     "grad_accum_steps": args.grad_accum_steps, "ranks": [p for _, p in per_rank]}
        if fp16_scaler is not None:
            save_dict['fp16_scaler'] = fp16_scaler.state_dict()
        utils.save_on_master(save_dict, checkpoint_path)
        if rank_position is None and args.saveckp_freq and (epochs_done - 1) % args.saveckp_freq == 0:
            utils.save_on_master(save_dict, os.path.join(args.output_dir, f'checkpoint{epochs_done - 1:04}.pth'))

    stop = StopSignals(args.world_size)
    every_iters = getattr(args, "saveckp_every_iters", 0)

    def between_steps(it: int, position_fn: Callable[[], Dict]) -> None:
        signum = stop.agreed()
        if signum or (every_iters and (it + 1) % every_iters == 0):
            epoch, step_in_epoch = divmod(it, niter_per_ep)
            save_checkpoint(epoch, position_fn())
            if signum:
                raise stop.interrupted(signum, f"at epoch {epoch}, iteration {step_in_epoch + 1}/{niter_per_ep}",
                                       checkpoint_path)

    start_time = time.time()
    with tracker, stop:
        for epoch in range(start_epoch, args.epochs):
            rank_position = position["ranks"][args.rank] if position and position["epoch"] == epoch else None
            start = rank_position["batches"] * args.batch_size_per_gpu if rank_position else 0
            data_loader.sampler.set_epoch(epoch, start)
            train_stats = train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch,
                                          args, fp16_scaler, autocast, bad_images, after_step, rank_position,
                                          between_steps, tracker)
            data_loader.sampler.set_epoch(epoch, 0)
            position = None

            # ============ writing logs ... ============
            log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
            if knn_datasets and ((epoch + 1) % args.knn_eval_freq == 0 or epoch + 1 == args.epochs):
                log_stats.update(online_knn(knn_backbone, knn_datasets, args, autocast, knn_who))
            log_history.append(log_stats)
            save_checkpoint(epoch + 1)
            if utils.is_main_process():
                with open(log_path, "a") as f:
                    f.write(json.dumps(log_stats) + "\n")
                utils.plot_training_curves(log_path, os.path.join(args.output_dir, "training_curves.png"))
            tracker.log_epoch(niter_per_ep * (epoch + 1) - 1, log_stats)
            signum = stop.agreed()
            if signum and epoch + 1 < args.epochs:
                raise stop.interrupted(signum, f"after epoch {epoch}", checkpoint_path)
    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
    if utils.is_main_process():
        plot = os.path.join(args.output_dir, "training_curves.png")
        print(f"Log (one JSON line per epoch): {log_path}")
        print(f"Checkpoint: {checkpoint_path}")
        if os.path.isfile(plot):
            print(f"Training curves: {plot}")
            print("Compare runs with: python plot_curves.py RUN_DIR [RUN_DIR ...]")
