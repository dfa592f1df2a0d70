# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The training loop shared by main_dino.py and main_distill.py, so that both get the same resume, logs,
checkpoints, mixed precision and checks from one piece of code.

- `train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch, args, ...)`: the
  optimizer steps of one epoch: schedules, gradient accumulation, mixed precision, clipping, the frozen last
  layer, non-finite checks and metrics. What is specific to a method is `step(batch, epoch, it)`, the forward
  pass and loss, returning `(loss, {name: value})`, and `after_step(it)` (the teacher EMA of DINO), returning
  `{name: value}` to log.
- `Run`: the plumbing around the epochs of any training loop (this file's `fit`, and eval_linear.py):
  resume, log.txt kept in step with the checkpoint, the tracker, stop signals, and checkpoints that hold every
  rank's exact position inside an epoch.
- `fit(args, ...)`: pretraining's run: `Run` around `train_one_epoch`, with an evaluation callback after each
  epoch (eval_knn.py's online k-NN).
- `setup_run`, `precision_setup`: what every script does first (processes, seeds, output folder, precision).
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
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpointing
import data
import runtime
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


def steps_per_epoch(dataset, data_loader, args: argparse.Namespace) -> int:
    """Optimizer steps per epoch; stops with a message when the data cannot fill one."""
    utils.check_same_on_all_ranks({"images": len(dataset), "classes": len(dataset.base.classes)}, "the dataset")
    niter_per_ep = len(data_loader) // args.grad_accum_steps
    if niter_per_ep == 0:
        raise utils.UserError(
            f"{len(dataset)} images are not enough for one step of {args.batch_size_per_gpu} images x "
            f"{args.world_size} processes x {args.grad_accum_steps} accumulation steps: lower "
            "--batch_size_per_gpu or --grad_accum_steps, or use more data")
    classes = f"{len(dataset.base.classes)} classes" if dataset.base.classes else "no labels"
    print(f"Data loaded: there are {len(dataset)} images ({classes}), {niter_per_ep} optimizer steps per epoch.")
    return niter_per_ep


NONFINITE_ADVICE = ("Try a lower --lr, a longer --warmup_epochs, fp32 (--use_fp16 false), a larger "
                    "--freeze_last_layer, gradient clipping (--clip_grad 0.3), or a lower --teacher_temp; "
                    "--skip_nonfinite N skips up to N such steps instead of stopping.")


def check_finite(loss: torch.Tensor, epoch: int, it: int, args, all_finite: Optional[torch.Tensor] = None) -> None:
    """Stop on a non-finite loss. On GPU the check is deferred (`all_finite` accumulates on the device) so
    that no step waits for the host; then the bad iteration is only known to be at or before `it`. Collective:
    every rank calls it at the same iteration, and all stop together when the loss of any is not finite."""
    finite = bool(all_finite) if all_finite is not None else math.isfinite(loss.item())
    error = None
    if not finite:
        value = loss.item()
        where = f"iteration {it}" if not math.isfinite(value) else f"an iteration up to {it}"
        error = (f"Loss is {value if not math.isfinite(value) else 'not finite'} at epoch {epoch}, {where}: stopping "
                 f"training. The last good checkpoint ({os.path.join(args.output_dir, 'checkpoint.pth')}, if any) "
                 f"is untouched and the run resumes from it. {NONFINITE_ADVICE}")
    runtime.raise_together(error)


def check_finite_weights(model: nn.Module, where: str, args) -> None:
    """Stop when the weights of `model` are not finite `where` (e.g. "after epoch 3"); beside `check_finite`
    before every checkpoint and epoch-end evaluation. Only the loss is checked at every step: a non-finite
    gradient with a finite loss breaks the weights in one step, and a checkpoint written before the next loss
    shows it would hold them and be resumed from. One host-device synchronisation; collective, as check_finite."""
    params = [(name, p) for name, p in unwrap(model).named_parameters()]
    error = None
    if params and not bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        bad = [name for name, p in params if not bool(torch.isfinite(p).all())]
        error = (f"The student's weights are not finite {where} ({len(bad)} of {len(params)} tensors, e.g. "
                 f"{', '.join(bad[:3])}) although the loss was: a non-finite gradient. Stopping without writing "
                 f"this checkpoint: the last good one ({os.path.join(args.output_dir, 'checkpoint.pth')}, if any) "
                 f"is untouched and the run resumes from it. {NONFINITE_ADVICE}")
    runtime.raise_together(error)


def finite_step(student: nn.Module, loss: torch.Tensor, epoch: int, it: int, args, check_grads: bool = True) -> bool:
    """--skip_nonfinite N: whether this step's loss and (with `check_grads`) gradients are finite, agreed by all
    ranks; a non-finite step is skipped (one host-device synchronisation per step, only in this mode) and
    counted in `args.nonfinite_skipped`; the run stops at the (N+1)-th. With fp16, the gradients are left to
    GradScaler, which skips its own overflow steps: only a non-finite loss counts."""
    norms = utils.grad_norms(student)[1] if check_grads else None
    finite = torch.isfinite(loss).to(torch.float32)
    if norms is not None:
        finite = finite * torch.isfinite(norms.sum()).to(finite.device)
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


def train_one_epoch(step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer, data_loader,
                    lr_schedule: Sequence[float], wd_schedule: Sequence[float], epoch: int, args,
                    fp16_scaler: Optional[torch.amp.GradScaler] = None, autocast=contextlib.nullcontext,
                    bad_images: Optional[data.BadImageTracker] = None,
                    after_step: Optional[Callable[[int], Dict[str, Any]]] = None,
                    position: Optional[Dict[str, Any]] = None,
                    between_steps: Optional[Callable[[int, Callable[[], Dict]], None]] = None,
                    tracker: Optional[tracking.Tracker] = None, detector=None) -> Dict[str, float]:
    """One epoch of optimizer steps on `student` (the trained module, DDP-wrapped or not); returns the epoch
    averages of the loss, of what `step` and `after_step` return, of lr and wd, and images/s.

    `data_loader` yields `(batch, labels, bad)`; `bad` holds one unreadable-image report per sample ("" if
    none). `args` gives grad_accum_steps, clip_grad, freeze_last_layer, epochs, print_freq,
    batch_size_per_gpu, world_size, device and output_dir.

    Mid-epoch resume: `position` (this rank's, from `between_steps`) continues an epoch after its first
    `position["batches"]` batches, which the loader must already skip (`EpochSampler.set_epoch(epoch,
    start)`). `between_steps(it, position_fn)` runs after every optimizer step; `position_fn()` checks that
    the state is finite and returns this rank's position, for a checkpoint. `tracker` gets the metrics of
    every --log_freq-th step (log_iters.jsonl, TensorBoard, W&B); `detector`, see `watch_collapse`.
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
        check_finite_weights(student, f"inside epoch {epoch}", args)
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
        if bad_images is not None:
            if any(bad):
                bad_images.update([b for b in bad if b], check=False)
            runtime.raise_together(bad_images.error())  # all ranks together (one tiny CPU all-reduce per batch)
        if micro == 0:
            for i, param_group in enumerate(optimizer.param_groups):
                param_group["lr"] = float(lr_schedule[it]) * param_group.get("lr_scale", 1.0)
                if param_group.get("regularized", i == 0):  # official groups: only the first is regularized
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
        unscaled = False
        if skip_nonfinite:
            if fp16_scaler is not None:
                # judge the true gradients; an fp16 overflow of the scaled ones is GradScaler's to skip
                fp16_scaler.unscale_(optimizer)
                unscaled = True
            if not finite_step(student, step_loss, epoch, it, args, check_grads=fp16_scaler is None):
                optimizer.zero_grad(set_to_none=True)
                if fp16_scaler is not None:
                    fp16_scaler.update()  # unscale_ recorded its inf checks: lowers the scale
                continue  # the step is not applied (no update, no EMA)
        metric_logger.update(loss=loss, **terms)
        watch_collapse(detector, it, terms, args)

        log_now = tracker is not None and tracker.wants(it)
        norms = update_student(student, optimizer, fp16_scaler, args, epoch, unscaled, want_norms=log_now)
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
    check_finite_weights(student, f"after epoch {epoch}", args)

    return epoch_stats(metric_logger, n_images, elapsed_before + time.time() - epoch_start, bad_images, args)


def watch_collapse(detector, it: int, terms: Dict[str, Any], args) -> None:
    """`detector` (a health.CollapseDetector, or None) sees the metrics of every optimizer step on CPU, of every
    --print_freq-th on GPU (reading them waits for the device); it prints its one collapse warning, and with
    --stop_on_collapse every rank stops together."""
    if detector is None or (args.device.type != "cpu" and it % args.print_freq):
        return
    warning = detector.observe(it, terms)
    if warning:
        print(warning)
    if getattr(args, "stop_on_collapse", False):
        runtime.raise_together(None if not warning else (
            f"{warning} Stopping (--stop_on_collapse): the last checkpoint "
            f"({os.path.join(args.output_dir, 'checkpoint.pth')}, if any) is kept, from before this iteration."))


def update_student(student: nn.Module, optimizer: torch.optim.Optimizer,
                   fp16_scaler: Optional[torch.amp.GradScaler], args, epoch: int, unscaled: bool,
                   want_norms: bool) -> Optional[torch.Tensor]:
    """The optimizer step after the last micro-batch: unscale (fp16), clip, drop the last layer's gradients
    during --freeze_last_layer and the backbone's during --freeze_backbone_epochs, step. Returns the per-parameter gradient norms when clipped or `want_norms`."""
    if fp16_scaler is not None and args.clip_grad and not unscaled:
        fp16_scaler.unscale_(optimizer)  # unscale the gradients of optimizer's params
    norms = utils.clip_gradients(student, args.clip_grad) if args.clip_grad else None
    if want_norms and norms is None:
        norms = tracking.grad_norms(student, None if unscaled else fp16_scaler)
    utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    utils.cancel_gradients_backbone(epoch, student, getattr(args, "freeze_backbone_epochs", 0))
    if fp16_scaler is None:
        optimizer.step()
    else:
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norms


def epoch_stats(metric_logger: utils.MetricLogger, n_images: int, epoch_time: float,
                bad_images: Optional[data.BadImageTracker], args) -> Dict[str, float]:
    """The epoch averages over all processes, with images/s, the epoch time and the unreadable images."""
    metric_logger.synchronize_between_processes()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    n_bad = bad_images.count if bad_images is not None else 0
    if utils.is_dist_avail_and_initialized():
        t = torch.tensor([n_bad], dtype=torch.float64, device=args.device)
        dist.all_reduce(t)
        n_bad = int(t.item())
    stats.update(images_per_sec=n_images * args.world_size / epoch_time, epoch_time=epoch_time, bad_images=n_bad)
    print("Averaged stats:", metric_logger)
    return stats


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# The run around the epochs
# ----------------------------------------------------------------------------------------------------
class Run:
    """Resume, log.txt, tracker, stop signals and checkpoints around the epochs of a training loop.

        run = Run(args, checkpoint_path, iters_per_epoch=n, contents=lambda epochs_done, ranks: {...})
        restored = run.resume(check=..., run_variables={...}, model=model, optimizer=optimizer)
        with run:
            for epoch in range(run.start_epoch, args.epochs):
                position = run.rank_position(epoch)      # this rank's place inside an interrupted epoch
                stats = train(..., position, run.between_steps, run.tracker)
                run.end_epoch(epoch, log_stats)          # log.txt, checkpoint, tracker; stops on a signal

    `contents(epochs_done, ranks)` returns what the checkpoint holds besides the run's own keys (`epoch`,
    `rng_states`, `log_history`, `tracking`, and `position` inside an epoch); `ranks` is every rank's position
    inside an epoch, None at its end. `between_steps(it, position_fn)` takes the global iteration.
    """

    def __init__(self, args: argparse.Namespace, checkpoint_path: str, *, iters_per_epoch: int,
                 contents: Callable[[int, Optional[List[Dict]]], Dict[str, Any]], plot_curves: bool = False):
        self.args, self.path, self.iters_per_epoch = args, checkpoint_path, iters_per_epoch
        self.contents, self.plot_curves = contents, plot_curves
        self.log_path = os.path.join(args.output_dir, "log.txt")
        self.stop = runtime.StopSignals(args.world_size)
        self.start_epoch, self.log_history, self.position, self.tracker = 0, [], None, None
        self._exit_stack = contextlib.ExitStack()

    def _check_position(self, checkpoint: dict) -> None:
        """A position counts each rank's batches: it means the same samples only with the same split."""
        position, args = checkpoint.get("position"), self.args
        if position is None:
            return
        saved = (len(position["ranks"]), position.get("batch_size_per_gpu", args.batch_size_per_gpu),
                 position.get("grad_accum_steps", 1))
        if saved != (args.world_size, args.batch_size_per_gpu, getattr(args, "grad_accum_steps", 1)):
            raise utils.UserError(
                f"{self.path} was written in the middle of epoch {position['epoch']} by {saved[0]} processes with "
                f"--batch_size_per_gpu {saved[1]} and --grad_accum_steps {saved[2]}; resume it with the same "
                f"number of processes (this run has {args.world_size}) and the same flags")

    def resume(self, check: Optional[Callable[[dict], None]] = None, run_variables: Optional[Dict[str, Any]] = None,
               **modules) -> Dict[str, Any]:
        """Load the checkpoint, if any, into `modules` (by checkpoint key) and return the run variables (the
        run's own, and `run_variables` with their defaults), with log.txt made to match it."""
        if utils.is_main_process():
            checkpointing.remove_stale_temporaries(self.args.output_dir)

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
            if len(rng_states) == self.args.world_size:
                checkpointing.set_rng_state(rng_states[self.args.rank])
            if "log_history" in checkpoint:  # an official checkpoint has none: its log.txt stays as it is
                tracking.sync_log_with_checkpoint(self.log_path, self.log_history)
        accum = getattr(self.args, "grad_accum_steps", 1)
        first = self.start_epoch * self.iters_per_epoch + (self.position["batches"] // accum if self.position else 0)
        self.tracker = tracking.Tracker(self.args, start_iteration=first, iters_per_epoch=self.iters_per_epoch,
                                        images_per_batch=self.args.batch_size_per_gpu * self.args.world_size,
                                        state=restored["tracking"])
        return restored

    def __enter__(self) -> "Run":
        self._exit_stack.enter_context(self.tracker)
        self._exit_stack.enter_context(self.stop)
        return self

    def __exit__(self, *exc) -> None:
        self._exit_stack.__exit__(*exc)

    def rank_position(self, epoch: int) -> Optional[Dict[str, Any]]:
        """This rank's position inside `epoch` when the checkpoint was written inside it, else None."""
        if self.position is not None and self.position["epoch"] == epoch:
            return self.position["ranks"][self.args.rank]
        return None

    def checkpoint(self, epochs_done: int, rank_position: Optional[Dict[str, Any]] = None) -> None:
        """The checkpoint after `epochs_done` epochs, or, with this rank's `rank_position`, inside epoch
        `epochs_done` with every rank's position in it (every rank calls this at the same step)."""
        args = self.args
        per_rank = [(checkpointing.get_rng_state(), rank_position)]
        if args.world_size > 1:
            per_rank = [None] * args.world_size
            dist.all_gather_object(per_rank, (checkpointing.get_rng_state(), rank_position))
        ranks = [p for _, p in per_rank] if rank_position is not None else None
        save_dict = {**self.contents(epochs_done, ranks), "epoch": epochs_done,
                     "rng_states": [r for r, _ in per_rank], "log_history": self.log_history,
                     "tracking": self.tracker.state_dict()}
        if rank_position is not None:
            save_dict["position"] = {"epoch": epochs_done, "batches": rank_position["batches"],
                                     "batch_size_per_gpu": args.batch_size_per_gpu,
                                     "grad_accum_steps": getattr(args, "grad_accum_steps", 1), "ranks": ranks}
        every = getattr(args, "saveckp_freq", 0)
        error = None
        try:  # rank 0 writes; a full disk there stops every rank at once
            checkpointing.save_on_master(save_dict, self.path)
            if rank_position is None and every and (epochs_done - 1) % every == 0:
                checkpointing.save_on_master(save_dict, os.path.join(args.output_dir,
                                                                     f"checkpoint{epochs_done - 1:04}.pth"))
        except utils.UserError as e:
            error = str(e)
        runtime.raise_together(error)

    def between_steps(self, it: int, position_fn: Callable[[], Dict]) -> None:
        """After an optimizer step (global iteration `it`): on a signal (agreed by all ranks, so that they stop at
        the same step) or every --saveckp_every_iters iterations, checkpoint the exact position."""
        signum = self.stop.agreed()
        every = getattr(self.args, "saveckp_every_iters", 0)
        if signum or (every and (it + 1) % every == 0):
            epoch, step_in_epoch = divmod(it, self.iters_per_epoch)
            self.checkpoint(epoch, position_fn())
            if signum:
                raise self.stop.interrupted(signum, f"at epoch {epoch}, iteration {step_in_epoch + 1}/"
                                            f"{self.iters_per_epoch}", self.path)

    def _append_log(self, log_stats: Dict[str, Any], plot: bool) -> None:
        """One record appended to log.txt by rank 0 (and the curves redrawn); a failure stops every rank."""
        error = None
        if utils.is_main_process():
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(log_stats) + "\n")
            except OSError as e:
                error = (f"could not write {self.log_path}: {e}. Free some space or fix the folder, then run the "
                         "same command again to resume")
            if plot and error is None:
                tracking.plot_training_curves(self.log_path, os.path.join(self.args.output_dir, "training_curves.png"))
        runtime.raise_together(error)

    def log_start(self, log_stats: Dict[str, Any]) -> None:
        """The figures of the network before the first step (a log.txt record with epoch -1, before epoch 0's),
        kept in the checkpoints' log history like the epochs'."""
        log_stats = {**log_stats, "epoch": -1}
        self.log_history.append(log_stats)
        self._append_log(log_stats, plot=False)
        self.tracker.log_epoch(0, log_stats)

    def end_epoch(self, epoch: int, log_stats: Dict[str, Any]) -> None:
        """log.txt, the checkpoint and the tracker after `epoch`; stops here when a signal arrived during it."""
        self.log_history.append(log_stats)
        self.checkpoint(epoch + 1)
        self._append_log(log_stats, plot=self.plot_curves)
        self.tracker.log_epoch(self.iters_per_epoch * (epoch + 1) - 1, log_stats)
        signum = self.stop.agreed()
        if signum and epoch + 1 < self.args.epochs:
            raise self.stop.interrupted(signum, f"after epoch {epoch}", self.path)


def has_checkpoint(args: argparse.Namespace) -> bool:
    """Whether `fit` will resume from output_dir/checkpoint.pth (then initial weights are not read)."""
    found = os.path.isfile(os.path.join(args.output_dir, "checkpoint.pth"))
    if found and getattr(args, "pretrained_weights", ""):
        print(f"Resuming from {os.path.join(args.output_dir, 'checkpoint.pth')}: --pretrained_weights not read.")
    return found


def fit(args: argparse.Namespace, *, step: StepFn, student: nn.Module, optimizer: torch.optim.Optimizer,
        data_loader, lr_schedule, wd_schedule, state: Dict[str, Any], autocast=contextlib.nullcontext,
        fp16_scaler: Optional[torch.amp.GradScaler] = None, after_step: Optional[Callable[[int], Dict]] = None,
        bad_images: Optional[data.BadImageTracker] = None,
        evaluate: Optional[Callable[[int], Dict[str, Any]]] = None,
        extra_checkpoint: Optional[Dict[str, Any]] = None,
        check_checkpoint: Optional[Callable[[dict], None]] = None, evaluate_at_start: bool = False,
        detector=None) -> None:
    """Train `student` for the epochs left, resuming from output_dir/checkpoint.pth when it exists.

    `state`: everything else that a checkpoint restores, by name (modules, optimizer, losses with a centre,
    the scaler). The checkpoint also holds `epoch`, `args`, per-rank RNG states, the log history and
    `extra_checkpoint`; `check_checkpoint(checkpoint)` can refuse a checkpoint before anything is loaded.
    `evaluate(epoch)`, if given, runs after every epoch and returns the figures to log (possibly none); with
    `evaluate_at_start`, also as `evaluate(-1)` before the first step of a new run (log.txt record of epoch -1).
    `detector`: a health.CollapseDetector watching the steps' metrics (see train_one_epoch).
    """
    niter_per_ep = len(data_loader) // args.grad_accum_steps

    def contents(epochs_done: int, ranks: Optional[List[Dict]]) -> Dict[str, Any]:
        saved = {"student": ddp_state_dict(student), **{k: v.state_dict() for k, v in state.items() if v is not None},
                 "optimizer": optimizer.state_dict(), "args": plain_args(args),
                 "nonfinite_skipped": args.nonfinite_skipped, **(extra_checkpoint or {})}
        if fp16_scaler is not None:
            saved["fp16_scaler"] = fp16_scaler.state_dict()
        return saved

    run = Run(args, os.path.join(args.output_dir, "checkpoint.pth"), iters_per_epoch=niter_per_ep,
              contents=contents, plot_curves=True)
    restored = run.resume(check=check_checkpoint, run_variables={"nonfinite_skipped": 0}, student=student,
                          optimizer=optimizer, fp16_scaler=fp16_scaler, **state)
    args.nonfinite_skipped = restored["nonfinite_skipped"]  # --skip_nonfinite counts over the whole run
    start_time = time.time()
    with run:
        if evaluate is not None and evaluate_at_start and run.start_epoch == 0 and run.position is None \
                and not run.log_history:
            print("Evaluating the network before the first step (--knn_eval_at_start)")
            run.log_start(evaluate(-1))
        for epoch in range(run.start_epoch, args.epochs):
            rank_position = run.rank_position(epoch)
            start = rank_position["batches"] * args.batch_size_per_gpu if rank_position else 0
            data_loader.sampler.set_epoch(epoch, start)
            train_stats = train_one_epoch(step, student, optimizer, data_loader, lr_schedule, wd_schedule, epoch,
                                          args, fp16_scaler, autocast, bad_images, after_step, rank_position,
                                          run.between_steps, run.tracker, detector)
            data_loader.sampler.set_epoch(epoch, 0)
            log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
            if evaluate is not None:
                log_stats.update(evaluate(epoch))
            run.end_epoch(epoch, log_stats)
    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
    if utils.is_main_process():
        start = next((r for r in run.log_history if r.get("epoch") == -1 and "knn_top1" in r), None)
        last = next((r for r in reversed(run.log_history) if r.get("epoch", -1) >= 0 and "knn_top1" in r), None)
        if start is not None and last is not None:
            print(f"20-NN top-1: {start['knn_top1']:.2f}% before training, {last['knn_top1']:.2f}% after epoch "
                  f"{last['epoch']} ({last['knn_top1'] - start['knn_top1']:+.2f} points)")
        plot = os.path.join(args.output_dir, "training_curves.png")
        print(f"Log (one JSON line per epoch): {run.log_path}")
        print(f"Checkpoint: {run.path}")
        if os.path.isfile(plot):
            print(f"Training curves: {plot}")
            print("Compare runs with: python plot_curves.py RUN_DIR [RUN_DIR ...]")
