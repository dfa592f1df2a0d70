# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# train_one_epoch follows the order of operations of facebookresearch/dino's main_dino.py (Apache 2.0).
"""The training loop shared by main_dino.py and main_distill.py, so that both get the same resume, logs,
checkpoints, mixed precision and checks from one piece of code.

- `train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch, args, ...)`: the
  optimizer steps of one epoch in the official order: forward and loss (`step(batch, epoch, it)`, the method's
  part, returning `(loss, {name: value})`), backward, clipping and the frozen last layer, the optimizer step,
  `after_step(it)` (DINO's teacher EMA, returning `{name: value}` to log), metrics.
- `NonFiniteGuard`: what a non-finite loss, gradient or weight does: stop the run, or skip the step.
- `Run`: the plumbing around the epochs of any training loop (this file's `fit`, and eval_linear.py):
  resume, log.txt kept in step with the checkpoint, the tracker, stop signals, and checkpoints that hold every
  rank's exact position inside an epoch, so that the same command resumes at the next iteration with the same
  samples and augmentations, as if never stopped.
- `fit(args, ...)`: pretraining's run: `Run` around `train_one_epoch`, with an evaluation callback after each
  epoch (eval_knn.py's online k-NN, health.py's RankMe).
- `distribute`, `unwrap`, `ddp_state_dict`: the trained modules of a run of several processes.

Only `fit` and `train_one_epoch` read the flags (`args`); what they call takes values.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import secrets
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpointing
import data
import health
import runtime
import tracking
import utils

StepFn = Callable[[Any, int, int], Tuple[torch.Tensor, Dict[str, Any]]]

NONFINITE_ADVICE = ("Try a lower --lr, a longer --warmup_epochs, fp32 (--use_fp16 false), a larger "
                    "--freeze_last_layer, gradient clipping (--clip_grad 0.3), or a lower --teacher_temp; "
                    "--skip_nonfinite N skips up to N such steps instead of stopping.")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--saveckp_every_iters, of `Run`'s checkpoints inside an epoch (every training script has it)."""
    parser.add_argument('--saveckp_every_iters', default=0, type=int, help="""Also write the checkpoint every x
        iterations inside an epoch, with the exact position, for crashes without a signal (0: at the end of
        epochs, and on SIGTERM/SIGINT/SIGUSR2, which always checkpoint the exact position and stop).""")


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


def distribute(student: nn.Module, device: torch.device,
               teacher: Optional[nn.Module] = None) -> Tuple[nn.Module, Optional[nn.Module]]:
    """For a run of several processes: batch norms synchronised over them (SyncBatchNorm, CUDA only) and the
    student in DDP; an EMA `teacher` with batch norms is converted too and wrapped in DDP, as the official code
    does to make its synchronised batch norms work. One process: both unchanged."""
    if runtime.get_world_size() == 1:
        return student, teacher
    if utils.has_batchnorms(student):
        if device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            if teacher is not None:
                teacher = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(teacher),
                                                              device_ids=[device.index])
        else:
            print("Batch norms are not synchronised across CPU processes (SyncBatchNorm needs CUDA).")
    student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    return student, teacher


def steps_per_epoch(dataset, data_loader, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch; stops with a message when the data cannot fill one."""
    runtime.check_same_on_all_ranks({"images": len(dataset), "classes": len(dataset.base.classes)}, "the dataset")
    niter_per_ep = len(data_loader) // grad_accum_steps
    if niter_per_ep == 0:
        raise runtime.UserError(
            f"{len(dataset)} images are not enough for one step of {data_loader.batch_size} images x "
            f"{runtime.get_world_size()} processes x {grad_accum_steps} accumulation steps: lower "
            "--batch_size_per_gpu or --grad_accum_steps, or use more data")
    classes = f"{len(dataset.base.classes)} classes" if dataset.base.classes else "no labels"
    print(f"Data loaded: there are {len(dataset)} images ({classes}), {niter_per_ep} optimizer steps per epoch.")
    return niter_per_ep


def has_checkpoint(output_dir: str, pretrained_weights: str = "") -> bool:
    """Whether `fit` will resume from output_dir/checkpoint.pth (then `pretrained_weights` are not read)."""
    path = os.path.join(output_dir, "checkpoint.pth")
    found = os.path.isfile(path)
    if found and pretrained_weights:
        print(f"Resuming from {path}: --pretrained_weights not read.")
    return found


def nonfinite_weights(model: nn.Module) -> List[str]:
    """The names of `model`'s parameters that hold a NaN or an infinity (one host-device synchronisation)."""
    params = list(unwrap(model).named_parameters())
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return []
    return [name for name, p in params if not bool(torch.isfinite(p).all())]


class NonFiniteGuard:
    """Non-finite losses, gradients and weights, judged by every rank together.

    By default a non-finite loss stops the run: `watch` reads it after every backward on CPU, where that costs
    nothing; on GPU it accumulates on the device and is read every `print_freq` batches, so that no step waits
    for the host. `check_state`, before every checkpoint and evaluation, also stops on non-finite weights (a
    non-finite gradient behind a finite loss). With `skip_nonfinite` N > 0, `skip` judges every optimizer step
    instead (one synchronisation per step): a step whose loss or gradients are not finite is not applied and is
    counted in `skipped` (kept in the checkpoint), and the (N+1)-th stops the run. Stopping leaves the last good
    checkpoint, at `checkpoint_path`, untouched."""

    def __init__(self, device: torch.device, checkpoint_path: str = "checkpoint.pth", skip_nonfinite: int = 0,
                 print_freq: int = 10, skipped: int = 0):
        self.checkpoint_path, self.limit, self.skipped = checkpoint_path, skip_nonfinite, skipped
        self.check_every = 1 if device.type == "cpu" else print_freq
        self.all_finite = torch.ones((), dtype=torch.bool, device=device)
        self.last: Tuple[torch.Tensor, int, int] = (torch.zeros(()), 0, 0)  # the last loss, its epoch and batch

    def watch(self, loss: torch.Tensor, epoch: int, it: int) -> None:
        """After the backward of batch `it` of `epoch`: stop on a non-finite loss (not with --skip_nonfinite)."""
        if self.limit:
            return
        self.all_finite &= torch.isfinite(loss)
        self.last = (loss, epoch, it)
        if it % self.check_every == 0:
            self.check_loss()

    def check_loss(self) -> None:
        """Stop, on every rank, when a loss since the start was not finite on any (collective). When the check
        was deferred, the bad iteration is only known to be at or before the last one."""
        loss, epoch, it = self.last
        error = None
        if not bool(self.all_finite):
            value = loss.item()
            where = f"iteration {it}" if not math.isfinite(value) else f"an iteration up to {it}"
            error = (f"Loss is {value if not math.isfinite(value) else 'not finite'} at epoch {epoch}, {where}: "
                     f"stopping training. The last good checkpoint ({self.checkpoint_path}, if any) is untouched "
                     f"and the run resumes from it. {NONFINITE_ADVICE}")
        runtime.raise_together(error)

    def check_state(self, student: nn.Module, where: str) -> None:
        """Before a checkpoint or an evaluation (`where`: e.g. "after epoch 3"): the losses so far and the
        student's weights, which a non-finite gradient breaks in one step (collective)."""
        if not self.limit:
            self.check_loss()
        bad, error = nonfinite_weights(student), None
        if bad:
            total = sum(1 for _ in unwrap(student).parameters())
            error = (f"The student's weights are not finite {where} ({len(bad)} of {total} tensors, e.g. "
                     f"{', '.join(bad[:3])}) although the loss was: a non-finite gradient. Stopping without writing "
                     f"this checkpoint: the last good one ({self.checkpoint_path}, if any) is untouched and the run "
                     f"resumes from it. {NONFINITE_ADVICE}")
        runtime.raise_together(error)

    def skip(self, student: nn.Module, loss: torch.Tensor, epoch: int, it: int, check_grads: bool = True) -> bool:
        """--skip_nonfinite: whether optimizer step `it` is skipped, its loss (or, with `check_grads`, its
        gradients) being non-finite on some rank. With fp16, overflowing gradients are GradScaler's to skip: then
        only the loss counts."""
        if not self.limit:
            return False
        finite = torch.isfinite(loss).to(torch.float32)
        norms = utils.grad_norms(student)[1] if check_grads else None
        if norms is not None:
            finite = finite * torch.isfinite(norms.sum()).to(finite.device)
        if runtime.is_dist_avail_and_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # the loss may be non-finite on one rank only
        if bool(finite):
            return False
        self.skipped += 1
        if self.skipped > self.limit:
            raise runtime.UserError(
                f"Non-finite loss or gradients at epoch {epoch}, iteration {it}, after {self.limit} skipped "
                f"step(s) (--skip_nonfinite): stopping training. The last good checkpoint ({self.checkpoint_path}, "
                f"if any) is untouched. {NONFINITE_ADVICE}")
        print(f"WARNING: non-finite loss or gradients at epoch {epoch}, iteration {it}: step skipped "
              f"({self.skipped} of at most {self.limit})")
        return True


def train_one_epoch(step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                    lr_schedule: Sequence[float], wd_schedule: Sequence[float], epoch: int, args: argparse.Namespace,
                    *, after_step: Optional[Callable[[int], Dict[str, Any]]] = None,
                    precision: Optional[runtime.Precision] = None, guard: Optional[NonFiniteGuard] = None,
                    bad_images: Optional[data.BadImageTracker] = None,
                    detector: Optional[health.CollapseDetector] = None, run: Optional["Run"] = None,
                    clip_gradients: Callable[[nn.Module, float], torch.Tensor] = utils.clip_gradients
                    ) -> Dict[str, float]:
    """One epoch of optimizer steps on `student` (DDP-wrapped or not); returns the epoch averages of the loss, of
    what `step` and `after_step` return, of lr and wd, and images/s. `data_loader` yields `(batch, labels, bad)`,
    `bad` holding an unreadable-image report per sample ("" if none) for `bad_images`. `args` gives
    grad_accum_steps, clip_grad, freeze_last_layer, freeze_backbone_epochs, epochs, print_freq, batch_size_per_gpu,
    world_size and device. `precision`: runtime.precision_setup's (None: fp32). `run`: the Run of this epoch, for
    its position inside an interrupted epoch (the loader already skips the consumed batches), its checkpoints
    between steps and its tracker. `clip_gradients(student, clip)` clips (--clip_grad) and returns the norms.

    Parameter groups may carry `lr_scale`, `wd_scale` (weight decay = schedule x wd_scale) and `last_layer`: with
    such groups (DINOv2's) the last layer is frozen by a learning rate of 0 during the first --freeze_last_layer
    epochs; without, as officially, by dropping its gradients."""
    autocast, scaler = (precision.autocast, precision.scaler) if precision else (contextlib.nullcontext, None)
    guard = guard or NonFiniteGuard(args.device, print_freq=args.print_freq)
    tracker, position = (run.tracker, run.rank_position(epoch)) if run else (None, None)
    metric_logger = utils.MetricLogger(delimiter="  ")
    accum, niter_per_ep = args.grad_accum_steps, len(data_loader) // args.grad_accum_steps
    lr_frozen_last_layer = any("last_layer" in group for group in optimizer.param_groups)
    epoch_start, n_images, elapsed_before, start_batch = time.time(), 0, 0.0, 0
    if position:
        start_batch, n_images, elapsed_before = position["batches"], position["n_images"], position["elapsed"]
        metric_logger.load_state_dict(position["meters"])
        if bad_images is not None:
            bad_images.load_state_dict(position["bad_images"])
        print(f"Resuming epoch {epoch} at batch {start_batch} of {len(data_loader)}")

    def position_fn() -> Dict[str, Any]:  # this rank's exact place, for a checkpoint inside the epoch
        guard.check_state(student, f"inside epoch {epoch}")
        return {"batches": it_local + 1, "n_images": n_images, "meters": metric_logger.state_dict(),
                "elapsed": elapsed_before + time.time() - epoch_start,
                "bad_images": bad_images.state_dict() if bad_images is not None else {}}

    batches = metric_logger.log_every(tracker.timed(data_loader) if tracker else data_loader, args.print_freq,
                                      f"Epoch: [{epoch}/{args.epochs}]",
                                      images_per_iter=args.batch_size_per_gpu * args.world_size, start=start_batch)
    it_local, loss, step_loss = start_batch - 1, torch.zeros(()), torch.zeros(())
    for it_local, (batch, _, bad) in enumerate(batches, start=start_batch):
        step_in_epoch, micro = divmod(it_local, accum)
        if step_in_epoch >= niter_per_ep:
            break  # the last incomplete accumulation
        it = niter_per_ep * epoch + step_in_epoch  # global training iteration (optimizer steps)
        if bad_images is not None:
            bad_images.agree(bad)  # every rank stops together past --max_bad_images_fraction
        if micro == 0:  # update weight decay and learning rate according to their schedule
            for i, param_group in enumerate(optimizer.param_groups):
                param_group["lr"] = float(lr_schedule[it]) * param_group.get("lr_scale", 1.0)
                if param_group.get("last_layer") and epoch < args.freeze_last_layer:
                    param_group["lr"] = 0.0  # DINOv2's frozen last layer: lr 0, its AdamW moments still move
                if "wd_scale" in param_group:  # DINOv2's groups
                    param_group["weight_decay"] = float(wd_schedule[it]) * param_group["wd_scale"]
                elif param_group.get("regularized", i == 0):  # official groups: only the first is regularized
                    param_group["weight_decay"] = float(wd_schedule[it])

        # forward passes + loss, then backward; DDP all-reduces the gradients at the last micro-batch only
        last_micro = micro == accum - 1
        with contextlib.nullcontext() if last_micro or not hasattr(student, "no_sync") else student.no_sync():
            with autocast():
                loss, terms = step(to_device(batch, args.device), epoch, it)
            (loss / accum if scaler is None else scaler.scale(loss / accum)).backward()
        loss = loss.detach()
        step_loss = loss if micro == 0 else step_loss + loss
        n_images += len(bad)
        guard.watch(loss, epoch, it_local)
        if not last_micro:
            metric_logger.update(loss=loss, **terms)
            continue

        # student update: the true (unscaled) gradients wherever they are clipped, judged or logged
        log_now = tracker is not None and tracker.wants(it)
        if scaler is not None and (args.clip_grad or guard.limit or log_now):
            scaler.unscale_(optimizer)
        if guard.skip(student, step_loss, epoch, it, check_grads=scaler is None):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # unscale_ recorded its inf checks: lowers the scale
            continue  # not applied: no update, no EMA
        metric_logger.update(loss=loss, **terms)
        if detector is not None:
            detector.watch(it, terms)
        norms = clip_gradients(student, args.clip_grad) if args.clip_grad else None
        if log_now and norms is None:
            norms = utils.grad_norms(student)[1]
        if not lr_frozen_last_layer:  # the official way: no gradient, so AdamW leaves weights and moments alone
            utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        utils.cancel_gradients_backbone(epoch, student, args.freeze_backbone_epochs)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        after = after_step(it) if after_step is not None else {}  # DINO: EMA update of the teacher

        # logging
        group = optimizer.param_groups[0]
        metric_logger.update(**after, lr=group["lr"], wd=group["weight_decay"])
        if log_now:
            tracker.log_iteration(it, {"loss": step_loss / accum, **terms, **after, "lr": group["lr"],
                                       "wd": group["weight_decay"]}, grad_norms=norms)
        if run is not None:
            run.clock.step_done(it)
            if step_in_epoch + 1 < niter_per_ep:
                run.between_steps(it, position_fn)
    guard.check_state(student, f"after epoch {epoch}")
    return epoch_stats(metric_logger, n_images, elapsed_before + time.time() - epoch_start, bad_images, args.device)


def epoch_stats(metric_logger: utils.MetricLogger, n_images: int, epoch_time: float,
                bad_images: Optional[data.BadImageTracker], device: torch.device) -> Dict[str, float]:
    """The epoch averages over all processes, with images/s, the epoch time and the unreadable images."""
    metric_logger.synchronize_between_processes()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    n_bad = bad_images.count if bad_images is not None else 0
    if runtime.is_dist_avail_and_initialized():
        t = torch.tensor([n_bad], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        n_bad = int(t.item())
    stats.update(images_per_sec=n_images * runtime.get_world_size() / epoch_time, epoch_time=epoch_time,
                 bad_images=n_bad)
    print("Averaged stats:", metric_logger)
    return stats


def link_copy(source: str, path: str) -> bool:
    """`path` as a hard link to the file just written at `source` (the same bytes, without serialising and writing
    them again: half the checkpoint time of an epoch that also writes checkpointNNNN.pth). Safe because `source`
    is only ever replaced by a rename, which leaves the link's content alone. False where links are not possible
    (some network file systems): the caller writes the file instead."""
    # atomic_write's temporary name: remove_stale_temporaries knows it if the process dies in between
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        return False


class Run:
    """Resume, log.txt, tracker, stop signals and checkpoints around the epochs of a training loop.

        run = Run(output_dir, iters_per_epoch=n, epochs=e, batch_size_per_gpu=b, contents=lambda done, ranks: {...})
        restored = run.resume(check=..., run_variables={...}, model=model, optimizer=optimizer)
        with run:
            for epoch in range(run.start_epoch, epochs):
                position = run.rank_position(epoch)   # this rank's place inside an interrupted epoch
                train_stats = train(...)              # calls run.between_steps(it, position_fn) after each step
                run.end_epoch(epoch, train_stats, other_stats)   # log.txt, checkpoint, tracker; stops on a signal

    `contents(epochs_done, ranks)` returns what the checkpoint `checkpoint_name` holds besides the run's own keys
    (`epoch`, `rng_states`, `log_history`, `tracking`, and `position` inside an epoch); `ranks` is every rank's
    position inside an epoch, None at its end. Checkpoints are written after every epoch, every `saveckp_freq`
    epochs also as checkpointNNNN.pth, every `saveckp_every_iters` iterations and on a stop signal.
    `tracking_options`: the Tracker's (tracking.options(args)); `plot_curves`: redraw training_curves.png.
    """

    def __init__(self, output_dir: str, *, iters_per_epoch: int, epochs: int, batch_size_per_gpu: int,
                 contents: Callable[[int, Optional[List[Dict]]], Dict[str, Any]],
                 checkpoint_name: str = "checkpoint.pth", grad_accum_steps: int = 1, saveckp_freq: int = 0,
                 saveckp_every_iters: int = 0, tracking_options: Optional[Dict[str, Any]] = None,
                 plot_curves: bool = False):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, checkpoint_name)
        self.iters_per_epoch, self.epochs, self.contents = iters_per_epoch, epochs, contents
        self.batch_size_per_gpu, self.grad_accum_steps = batch_size_per_gpu, grad_accum_steps
        self.saveckp_freq, self.saveckp_every_iters = saveckp_freq, saveckp_every_iters
        self.tracking_options, self.plot_curves = dict(tracking_options or {}), plot_curves
        self.rank, self.world_size = runtime.get_rank(), runtime.get_world_size()
        self.log_path = os.path.join(output_dir, "log.txt")
        self.stop = runtime.StopSignals(self.world_size)
        self.start_epoch, self.log_history, self.position, self.tracker = 0, [], None, None
        self.clock = tracking.RunClock(iters_per_epoch, epochs)
        self._exit_stack = contextlib.ExitStack()

    def _check_position(self, checkpoint: dict) -> None:
        """A position counts each rank's batches: it means the same samples only with the same split."""
        position = checkpoint.get("position")
        if position is None:
            return
        saved = (len(position["ranks"]), position.get("batch_size_per_gpu", self.batch_size_per_gpu),
                 position.get("grad_accum_steps", 1))
        if saved != (self.world_size, self.batch_size_per_gpu, self.grad_accum_steps):
            raise runtime.UserError(
                f"{self.path} was written in the middle of epoch {position['epoch']} by {saved[0]} processes with "
                f"--batch_size_per_gpu {saved[1]} and --grad_accum_steps {saved[2]}; resume it with the same "
                f"number of processes (this run has {self.world_size}) and the same flags")

    def resume(self, check: Optional[Callable[[dict], None]] = None, run_variables: Optional[Dict[str, Any]] = None,
               **modules) -> Dict[str, Any]:
        """Load the checkpoint, if any, into `modules` (by checkpoint key) and return the run variables (the
        run's own, and `run_variables` with their defaults), with log.txt made to match it."""
        if runtime.is_main_process():
            checkpointing.remove_stale_temporaries(self.output_dir)

        def check_all(checkpoint: dict) -> None:
            if check is not None:
                check(checkpoint)
            self._check_position(checkpoint)

        restored = {"epoch": 0, "log_history": [], "position": None, "tracking": None, **(run_variables or {})}
        checkpoint = checkpointing.restart_from_checkpoint(self.path, run_variables=restored, check=check_all,
                                                           **modules)
        self.start_epoch, self.position = restored["epoch"], restored["position"]
        self.log_history = list(restored["log_history"])
        if checkpoint is None:
            tracking.sync_log_with_checkpoint(self.log_path, None)
        else:
            rng_states = checkpoint.get("rng_states") or []
            if len(rng_states) == self.world_size:
                checkpointing.set_rng_state(rng_states[self.rank])
            if "log_history" in checkpoint:  # an official checkpoint has none: its log.txt stays as it is
                tracking.sync_log_with_checkpoint(self.log_path, self.log_history)
        batches = self.position["batches"] // self.grad_accum_steps if self.position else 0
        self.tracker = tracking.Tracker(self.output_dir, **self.tracking_options,
                                        start_iteration=self.start_epoch * self.iters_per_epoch + batches,
                                        iters_per_epoch=self.iters_per_epoch,
                                        images_per_batch=self.batch_size_per_gpu * self.world_size,
                                        state=restored["tracking"])
        return restored

    def is_new(self) -> bool:
        """Whether nothing of this run has happened yet (no checkpoint, no log record)."""
        return self.start_epoch == 0 and self.position is None and not self.log_history

    def __enter__(self) -> "Run":
        self._exit_stack.enter_context(self.tracker)
        self._exit_stack.enter_context(self.stop)
        return self

    def __exit__(self, *exc) -> None:
        self._exit_stack.__exit__(*exc)

    def rank_position(self, epoch: int) -> Optional[Dict[str, Any]]:
        """This rank's position inside `epoch` when the checkpoint was written inside it, else None."""
        if self.position is not None and self.position["epoch"] == epoch:
            return self.position["ranks"][self.rank]
        return None

    def checkpoint(self, epochs_done: int, rank_position: Optional[Dict[str, Any]] = None) -> None:
        """The checkpoint after `epochs_done` epochs, or, with this rank's `rank_position`, inside epoch
        `epochs_done` with every rank's position in it (every rank calls this at the same step)."""
        per_rank = [(checkpointing.get_rng_state(), rank_position)]
        if self.world_size > 1:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, (checkpointing.get_rng_state(), rank_position))
        ranks = [p for _, p in per_rank] if rank_position is not None else None
        save_dict = {**self.contents(epochs_done, ranks), "epoch": epochs_done,
                     "rng_states": [r for r, _ in per_rank], "log_history": self.log_history,
                     "tracking": self.tracker.state_dict()}
        if rank_position is not None:
            save_dict["position"] = {"epoch": epochs_done, "batches": rank_position["batches"],
                                     "batch_size_per_gpu": self.batch_size_per_gpu,
                                     "grad_accum_steps": self.grad_accum_steps, "ranks": ranks}
        error = None
        try:  # rank 0 writes; a full disk there stops every rank at once
            checkpointing.save_on_master(save_dict, self.path)
            if rank_position is None and self.saveckp_freq and (epochs_done - 1) % self.saveckp_freq == 0:
                periodic = os.path.join(self.output_dir, f"checkpoint{epochs_done - 1:04}.pth")
                if runtime.is_main_process() and not link_copy(self.path, periodic):
                    checkpointing.save_on_master(save_dict, periodic)
        except runtime.UserError as e:
            error = str(e)
        runtime.raise_together(error)

    def between_steps(self, it: int, position_fn: Callable[[], Dict]) -> None:
        """After an optimizer step (global iteration `it`): on a signal (agreed by all ranks, so that they stop at
        the same step) or every `saveckp_every_iters` iterations, checkpoint the exact position."""
        signum = self.stop.agreed()
        every = self.saveckp_every_iters
        if signum or (every and (it + 1) % every == 0):
            epoch, step_in_epoch = divmod(it, self.iters_per_epoch)
            self.checkpoint(epoch, position_fn())
            if signum:
                raise self.stop.interrupted(signum, f"at epoch {epoch}, iteration {step_in_epoch + 1}/"
                                            f"{self.iters_per_epoch}", self.path)

    def _append_log(self, log_stats: Dict[str, Any], plot: bool) -> None:
        """One record appended to log.txt by rank 0 (and the curves redrawn); a failure stops every rank."""
        error = None
        if runtime.is_main_process():
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(log_stats) + "\n")
                if plot:
                    tracking.plot_training_curves(self.log_path, os.path.join(self.output_dir, "training_curves.png"))
            except OSError as e:
                error = (f"could not write {self.log_path}: {e}. Free some space or fix the folder, then run the "
                         "same command again to resume")
            except runtime.UserError as e:  # the curves' atomic write
                error = str(e)
        runtime.raise_together(error)

    def log_start(self, log_stats: Dict[str, Any]) -> None:
        """The figures of the network before the first step (a log.txt record with epoch -1, before epoch 0's),
        kept in the checkpoints' log history like the epochs'."""
        log_stats = {**log_stats, "epoch": -1}
        self.log_history.append(log_stats)
        self._append_log(log_stats, plot=False)
        self.tracker.log_epoch(0, log_stats)

    def end_epoch(self, epoch: int, train_stats: Dict[str, Any], other_stats: Optional[Dict[str, Any]] = None) -> None:
        """log.txt's record of `epoch` (`train_stats` as train_*, then `other_stats`, e.g. the evaluation), the
        checkpoint and the tracker; stops here when a signal arrived during the epoch."""
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch, **(other_stats or {})}
        self.clock.epoch_done(epoch, train_stats, other_stats or {})
        self.log_history.append(log_stats)
        self.checkpoint(epoch + 1)
        self._append_log(log_stats, plot=self.plot_curves)
        self.tracker.log_epoch(self.iters_per_epoch * (epoch + 1) - 1, log_stats)
        signum = self.stop.agreed()
        if signum and epoch + 1 < self.epochs:
            raise self.stop.interrupted(signum, f"after epoch {epoch}", self.path)


def fit(args: argparse.Namespace, *, step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer,
        data_loader, lr_schedule, wd_schedule, precision: runtime.Precision, state: Dict[str, Any],
        after_step: Optional[Callable[[int], Dict]] = None, evaluate: Optional[Callable[[int], Dict[str, Any]]] = None,
        extra_checkpoint: Optional[Dict[str, Any]] = None,
        check_checkpoint: Optional[Callable[[dict], None]] = None,
        clip_gradients: Callable[[nn.Module, float], torch.Tensor] = utils.clip_gradients) -> None:
    """Train `student` for the epochs left, resuming from output_dir/checkpoint.pth when it exists.

    `state`: everything else that a checkpoint restores, by name (modules, optimizer, losses with a centre).
    The checkpoint also holds `epoch`, `args`, per-rank RNG states, the log history, the scaler and
    `extra_checkpoint`; `check_checkpoint(checkpoint)` can refuse a checkpoint before anything is loaded.
    `evaluate(epoch)`, if given, runs after every epoch and returns the figures to log (possibly none); with
    --knn_eval_at_start, also as `evaluate(-1)` before the first step of a new run (log.txt record of epoch -1).
    Unreadable images are counted against --max_bad_images_fraction, non-finite steps judged by a
    NonFiniteGuard, and the steps' health signals watched by a health.CollapseDetector. `clip_gradients`: as
    train_one_epoch takes it (per parameter, officially).
    """
    niter_per_ep = len(data_loader) // args.grad_accum_steps
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    guard = NonFiniteGuard(args.device, checkpoint_path, args.skip_nonfinite, args.print_freq)

    def contents(epochs_done: int, ranks: Optional[List[Dict]]) -> Dict[str, Any]:
        saved = {"student": ddp_state_dict(student), **{k: v.state_dict() for k, v in state.items() if v is not None},
                 "optimizer": optimizer.state_dict(), "args": checkpointing.plain_args(args),
                 "nonfinite_skipped": guard.skipped, **(extra_checkpoint or {})}
        if precision.scaler is not None:
            saved["fp16_scaler"] = precision.scaler.state_dict()
        return saved

    run = Run(args.output_dir, iters_per_epoch=niter_per_ep, epochs=args.epochs, contents=contents,
              batch_size_per_gpu=args.batch_size_per_gpu, grad_accum_steps=args.grad_accum_steps,
              saveckp_freq=args.saveckp_freq, saveckp_every_iters=args.saveckp_every_iters,
              tracking_options=tracking.options(args), plot_curves=True)
    restored = run.resume(check=check_checkpoint, run_variables={"nonfinite_skipped": 0}, student=student,
                          optimizer=optimizer, fp16_scaler=precision.scaler, **state)
    guard.skipped = restored["nonfinite_skipped"]  # --skip_nonfinite counts over the whole run
    bad_images = data.BadImageTracker(len(data_loader.dataset), args.max_bad_images_fraction)
    detector = health.build_detector(niter_per_ep, args.collapse_warmup, args.collapse_window,
                                     every=1 if args.device.type == "cpu" else args.print_freq,
                                     stop=args.stop_on_collapse, checkpoint_path=checkpoint_path)
    start_time = time.time()
    with run:
        if evaluate is not None and args.knn_eval_at_start and run.is_new():
            print("Evaluating the network before the first step (--knn_eval_at_start)")
            run.log_start(evaluate(-1))
        for epoch in range(run.start_epoch, args.epochs):
            position = run.rank_position(epoch)
            data_loader.sampler.set_epoch(epoch, position["batches"] * args.batch_size_per_gpu if position else 0)
            train_stats = train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch,
                                          args, after_step=after_step, precision=precision, guard=guard,
                                          bad_images=bad_images, detector=detector, run=run,
                                          clip_gradients=clip_gradients)
            data_loader.sampler.set_epoch(epoch, 0)
            run.end_epoch(epoch, train_stats, evaluate(epoch) if evaluate is not None else {})
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(time.time() - start_time)))))
    if runtime.is_main_process():
        print_outcome(run)


def print_outcome(run: Run) -> None:
    """What the run learned (the 20-NN before and after, when measured) and where its files are."""
    start = next((r for r in run.log_history if r.get("epoch") == -1 and "knn_top1" in r), None)
    last = next((r for r in reversed(run.log_history) if r.get("epoch", -1) >= 0 and "knn_top1" in r), None)
    if start is not None and last is not None:
        print(f"20-NN top-1: {start['knn_top1']:.2f}% before training, {last['knn_top1']:.2f}% after epoch "
              f"{last['epoch']} ({last['knn_top1'] - start['knn_top1']:+.2f} points)")
    plot = os.path.join(run.output_dir, "training_curves.png")
    print(f"Log (one JSON line per epoch): {run.log_path}")
    print(f"Checkpoint: {run.path}")
    if os.path.isfile(plot):
        print(f"Training curves: {plot}")
        print("Compare runs with: python plot_curves.py RUN_DIR [RUN_DIR ...]")
