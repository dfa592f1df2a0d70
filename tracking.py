# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Experiment tracking for the training scripts: log.txt, a per-iteration history file, TensorBoard, W&B and
the training-curve plot.

- `log_iters.jsonl` in the output folder: one JSON object every `--log_freq` optimizer steps (loss and
  its terms, lr, wd, teacher momentum and temperature, gradient norm, images/s, data time), always written,
  beside the per-epoch `log.txt`. `read_history(output_dir)` loads it (columns of lists, or a pandas
  DataFrame when pandas is installed).
- `--logger tensorboard wandb` (either, both, or none): the same values, plus every epoch's `log.txt`
  record, against the global training iteration, so that a resumed run continues the same curve.

    tracker = tracking.Tracker(output_dir, **tracking.options(args), start_iteration=..., iters_per_epoch=...,
                               images_per_batch=..., state=checkpoint.get("tracking"))
    with tracker:                                 # opens the files and loggers (rank 0 only)
        for batch in tracker.timed(loader):       # data time and images/s
            ...
            if tracker.wants(it):                 # every --log_freq iterations
                tracker.log_iteration(it, {"loss": loss, "lr": lr}, grad_norms=norms)
        tracker.log_epoch(last_iteration_of_epoch, log_stats)
        save({"tracking": tracker.state_dict(), ...})  # the W&B run id, for the resumed run

`RunClock` prints the whole run's time on this machine after the first steps and after the first epoch.

The values are device tensors: they are stacked and copied to the host asynchronously when logged, and
read one logging period later, so that logging does not make the host wait for the device. tensorboard and
wandb are imported only when asked for; a missing package stops the run before it starts, in one line.
"""
import argparse
import datetime
import json
import os
import shutil
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

import checkpointing
import utils

HISTORY_FILE = "log_iters.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOGGERS = ("tensorboard", "wandb")
# The package each logger needs, and the command that installs it (the one line a user gets).
REQUIREMENTS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment tracking")
    group.add_argument('--log_freq', default=10, type=int, help=f"""Append the metrics of every x-th training
        iteration to output_dir/{HISTORY_FILE} (and to the --logger's).""")
    group.add_argument('--logger', default=[], nargs='+', choices=LOGGERS, help=f"""Also log to TensorBoard
        (event files in output_dir/{TENSORBOARD_DIR}) and/or Weights & Biases (output_dir/wandb; offline when
        the W&B server cannot be reached, to upload later with `wandb sync`). Several allowed; none by default.""")
    group.add_argument('--wandb_project', default='dino', type=str, help="W&B project.")
    group.add_argument('--wandb_entity', default=None, type=str, help="W&B entity (user or team; default: yours).")
    group.add_argument('--wandb_run_name', default=None, type=str,
                       help="W&B run name (default: the name of --output_dir).")
    group.add_argument('--wandb_tags', default=[], nargs='*', type=str, help="W&B tags of the run.")


def check_args(args: argparse.Namespace) -> None:
    """--log_freq and the --logger packages, checked before anything is built."""
    if args.log_freq < 1:
        raise utils.UserError(f"--log_freq must be at least 1, got {args.log_freq}")
    for name in dict.fromkeys(args.logger):
        module, install = REQUIREMENTS[name]
        try:
            __import__(module)
        except ImportError:
            raise utils.UserError(f"--logger {name} needs the {module} package, which is not installed: "
                                  f"{install} (or leave {name} out of --logger)") from None


def options(args: argparse.Namespace) -> Dict[str, Any]:
    """`Tracker`'s keyword arguments from the flags of `add_tracking_args`, and the run's configuration."""
    return {"log_freq": args.log_freq, "loggers": list(args.logger),
            "wandb": {"project": args.wandb_project, "entity": args.wandb_entity, "name": args.wandb_run_name,
                      "tags": list(args.wandb_tags)},
            "config": checkpointing.plain_args(args)}


class _Pending:
    """One logged iteration whose device values are on their way to the host."""

    def __init__(self, it: int, record: Dict[str, Any], names: List[str], values: Optional[torch.Tensor]):
        self.it, self.record, self.names, self.event = it, record, names, None
        self.values = values
        if values is not None and values.is_cuda:
            # a non-blocking copy into pinned memory, read once this event has passed: no stall of the host
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> Dict[str, Any]:
        if self.event is not None:
            self.event.synchronize()
        if self.values is not None:
            self.record.update(zip(self.names, self.values.tolist()))
        return self.record


class _Timed:
    """Iterates over `iterable` and adds to the tracker's window the batches, the time spent waiting for
    them and the wall time of their iterations (each counted once the loop body has run)."""

    def __init__(self, iterable: Iterable, tracker: "Tracker"):
        self.iterable, self.tracker = iterable, tracker

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self) -> Iterator:
        window = self.tracker._window
        start = time.perf_counter()
        for batch in self.iterable:
            fetched = time.perf_counter()
            yield batch
            end = time.perf_counter()
            window[0] += 1
            window[1] += fetched - start
            window[2] += end - start
            start = end


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Tracker:
    """The history file and the loggers of one training run (active on rank 0 only; elsewhere every call
    does nothing). See the module docstring for the calls.

    `start_iteration`: the first training iteration this process runs (0 for a new run; on resume, the
    checkpoint's). A new run moves a previous run's history and TensorBoard folder aside (`.old`, as
    log.txt); a resumed one drops what was logged after its checkpoint, so that each iteration appears once.
    `state`: what `state_dict()` returned into the checkpoint (the W&B run id, continued on resume).
    """

    def __init__(self, output_dir: str, *, start_iteration: int, iters_per_epoch: int, images_per_batch: int,
                 log_freq: int = 10, loggers: Sequence[str] = (), wandb: Optional[Dict[str, Any]] = None,
                 config: Optional[Dict[str, Any]] = None, state: Optional[Dict[str, Any]] = None):
        self.output_dir, self.log_freq = output_dir, log_freq
        self.loggers = list(dict.fromkeys(loggers))
        self.wandb_options, self.config = dict(wandb or {}), dict(config or {})
        self.start_iteration, self.iters_per_epoch = start_iteration, max(iters_per_epoch, 1)
        self.images_per_batch = images_per_batch
        self.state = dict(state or {})
        self.active = utils.is_main_process()
        self.history_path = os.path.join(self.output_dir, HISTORY_FILE)
        self._window = [0, 0.0, 0.0]  # batches, data-wait seconds, wall seconds since the last logged iteration
        self._pending: List[_Pending] = []
        self._history = None
        self.tb_writer = None
        self.wandb_run = None
        self._wandb_min_step = 0
        self._opened = self._closed = False

    # ---- opening and closing ----
    def __enter__(self) -> "Tracker":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(interrupted=isinstance(exc, utils.TrainingInterrupted),
                   failed=exc is not None and not isinstance(exc, utils.TrainingInterrupted))

    def open(self) -> "Tracker":
        if not self.active or self._opened:
            return self
        self._opened = True
        if self.start_iteration == 0:
            self._move_aside(self.history_path)
            if "tensorboard" in self.loggers:
                self._move_aside(os.path.join(self.output_dir, TENSORBOARD_DIR))
        else:
            self._truncate_history()
        self._history = open(self.history_path, "a")
        print(f"History: every {self.log_freq} iterations in {self.history_path} "
              f"(tracking.read_history('{self.output_dir}') loads it).")
        if "tensorboard" in self.loggers:
            self._open_tensorboard()
        if "wandb" in self.loggers:
            self._open_wandb()
        return self

    def _move_aside(self, path: str) -> None:
        if os.path.lexists(path):
            old = path + ".old"
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            os.replace(path, old)
            print(f"New run: the previous {os.path.basename(path)} is now {os.path.basename(old)}")

    def _truncate_history(self) -> None:
        """Keep the iterations before the one this run resumes at (those after the checkpoint are redone)."""
        if not os.path.isfile(self.history_path):
            return
        kept = [r for r in read_log(self.history_path) if r.get("iteration", -1) < self.start_iteration]
        write_json_lines(self.history_path, kept)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        log_dir = os.path.join(self.output_dir, TENSORBOARD_DIR)
        # purge_step: TensorBoard drops the events a previous process wrote at or after the resumed iteration,
        # so the curve continues without duplicates.
        self.tb_writer = SummaryWriter(log_dir, purge_step=self.start_iteration or None, flush_secs=30)
        if self.start_iteration == 0:
            rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(self.config.items()))
            self.tb_writer.add_text("config", "| flag | value |\n| --- | --- |\n" + rows, 0)
        print(f"TensorBoard: event files in {log_dir}; view them with: tensorboard --logdir {log_dir}")

    def _open_wandb(self) -> None:
        import wandb
        resumed = self.start_iteration > 0 and bool(self.state.get("wandb_run_id"))
        mode = os.environ.get("WANDB_MODE")  # online, offline (e.g. no network), disabled
        # a new run gets its id from W&B; a resumed one continues the id kept in the checkpoint
        w = self.wandb_options
        kwargs = dict(project=w.get("project"), entity=w.get("entity"),
                      name=w.get("name") or os.path.basename(os.path.abspath(self.output_dir)),
                      tags=list(w.get("tags") or []) or None, dir=self.output_dir, config=self.config,
                      allow_val_change=True,
                      **({"id": self.state["wandb_run_id"], "resume": "allow"} if resumed else {}))
        try:
            self.wandb_run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # not logged in, server error: keep training, offline
            if mode == "offline":
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"W&B: could not start online ({reason}): logging offline.")
            mode = "offline"
            self.wandb_run = wandb.init(mode=mode, **kwargs)
        run_id = self.state["wandb_run_id"] = self.wandb_run.id
        # an online run that is resumed already holds the steps up to its last one: they are not sent again
        self._wandb_min_step = int(getattr(self.wandb_run, "step", 0) or 0) if resumed else 0
        mode = str(getattr(self.wandb_run.settings, "mode", mode or "online"))
        where = os.path.join(self.output_dir, "wandb")
        print(f"W&B: run {run_id} ({'resumed' if resumed else 'new'}, {mode}) in {where}.")
        if mode == "offline":
            print(f"W&B: to upload it, once online: wandb sync {os.path.join(where, 'offline-run-*-' + run_id)} "
                  "(every part of a resumed run goes to the same W&B run).")

    def close(self, interrupted: bool = False, failed: bool = False) -> None:
        """Write what is pending and close the history and the loggers (a W&B run stopped by a signal is
        marked preempted, so that it shows as such until the resumed job continues it)."""
        if not self.active or not self._opened or self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            if self._history is not None:
                self._history.close()
            if self.tb_writer is not None:
                self.tb_writer.close()
            if self.wandb_run is not None:
                if interrupted:
                    self.wandb_run.mark_preempting()
                self.wandb_run.finish(exit_code=1 if (interrupted or failed) else 0)

    # ---- logging ----
    def timed(self, iterable: Iterable) -> Iterable:
        """`iterable`, timed for the images/s and data time of the logged iterations."""
        return _Timed(iterable, self) if self.active else iterable

    def wants(self, it: int) -> bool:
        """Whether iteration `it` is logged (every --log_freq iterations, rank 0)."""
        return self.active and self._opened and it % self.log_freq == 0

    def log_iteration(self, it: int, metrics: Dict[str, Any], grad_norms: Optional[torch.Tensor] = None) -> None:
        """Log iteration `it`: numbers and 0-d tensors (read later, without waiting for the device), the
        total of the per-parameter gradient norms `grad_norms`, and images/s and data time measured by
        `timed` since the last logged iteration."""
        if not self.active:
            return
        record: Dict[str, Any] = {"iteration": it, "epoch": it // self.iters_per_epoch}
        names, tensors = [], []
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                names.append(k)
                tensors.append(v.detach().float().reshape(()))
                record[k] = None  # filled when read, in this order
            elif _is_number(v):
                record[k] = v
        if grad_norms is not None and grad_norms.numel():
            names.append("grad_norm")
            record["grad_norm"] = None
            tensors.append(torch.linalg.vector_norm(grad_norms.detach().float()))
        batches, data_wait, wall = self._window
        if batches:
            record["images_per_sec"] = batches * self.images_per_batch / max(wall, 1e-9)
            record["data_time"] = data_wait / batches
        self._window[:] = [0, 0.0, 0.0]
        if tensors:
            devices = {t.device for t in tensors}
            device = tensors[0].device if len(devices) == 1 else torch.device("cpu")
            values = torch.stack([t.to(device) for t in tensors])
        else:
            values = None
        record["time"] = time.time()
        self.flush()  # the previous logged iteration, a logging period ago: its copy has long finished
        self._pending.append(_Pending(it, record, names, values))

    def log_epoch(self, step: int, stats: Dict[str, Any]) -> None:
        """An epoch's log.txt record, at `step` (its last iteration) in TensorBoard and W&B."""
        if not self.active:
            return
        self.flush()
        numbers = {f"epoch/{k}": v for k, v in stats.items() if _is_number(v) and k != "epoch"}
        if self.tb_writer is not None:
            for k, v in numbers.items():
                self.tb_writer.add_scalar(k, v, step)
            self.tb_writer.flush()
        if self.wandb_run is not None and step >= self._wandb_min_step:
            self.wandb_run.log({**numbers, "epoch": stats.get("epoch", step // self.iters_per_epoch)}, step=step)

    def flush(self) -> None:
        """Write every pending iteration (waits for the device)."""
        while self._pending:
            self._write(self._pending.pop(0).result())
        if self._history is not None:
            self._history.flush()

    def _write(self, record: Dict[str, Any]) -> None:
        self._history.write(json.dumps(record) + "\n")
        self._history.flush()
        it = record["iteration"]
        scalars = {f"train/{k}": v for k, v in record.items() if k not in ("iteration", "epoch", "time")}
        if self.tb_writer is not None:
            for k, v in scalars.items():
                self.tb_writer.add_scalar(k, v, it)
        if self.wandb_run is not None and it >= self._wandb_min_step:
            self.wandb_run.log({**scalars, "epoch": record["epoch"]}, step=it)

    def state_dict(self) -> Dict[str, Any]:
        """For the checkpoint: the W&B run id (kept from a previous run even when W&B is not used now). Writes
        what is pending first, so that a checkpoint never leaves a logged iteration unwritten."""
        if self.active and self._opened and not self._closed:
            self.flush()
        return dict(self.state)


# ----------------------------------------------------------------------------------------------------
# Reading a run's history
# ----------------------------------------------------------------------------------------------------
def read_history(path: str, as_dataframe: Optional[bool] = None):
    """A run's per-iteration history: `path` is its output folder or its log_iters.jsonl.

    Returns a pandas DataFrame (one row per logged iteration) when pandas is installed, else (or with
    `as_dataframe=False`) a dict of columns, {name: [value per logged iteration, None where missing]}.
    """
    if os.path.isdir(path):
        path = os.path.join(path, HISTORY_FILE)
    if not os.path.isfile(path):
        raise utils.UserError(f"{path} does not exist: give a run's output folder or its {HISTORY_FILE}")
    records = read_log(path)  # skips a line cut short by a crash
    if as_dataframe is None or as_dataframe:
        try:
            import pandas
            return pandas.DataFrame.from_records(records)
        except ImportError:
            if as_dataframe:
                raise utils.UserError("read_history(as_dataframe=True) needs pandas: pip install pandas") from None
    columns: Dict[str, List[Any]] = {}
    for r in records:
        for k in r:
            columns.setdefault(k, [])
    return {k: [r.get(k) for r in records] for k in columns}


# ----------------------------------------------------------------------------------------------------
# log.txt and the curves drawn from it
# ----------------------------------------------------------------------------------------------------
def sync_log_with_checkpoint(log_path: str, log_history: Optional[Sequence[Dict[str, Any]]]) -> None:
    """Make log.txt hold exactly the epochs of the checkpoint a run resumes from (`log_history`; none lost,
    none repeated), or, when starting without a checkpoint (`log_history` None), move a stale log.txt,
    which belongs to another run, aside to log.txt.old rather than append to it. Main process only."""
    if not utils.is_main_process():
        return
    if log_history is not None:
        write_json_lines(log_path, log_history)
    elif os.path.exists(log_path):
        os.replace(log_path, log_path + ".old")
        print(f"No checkpoint in {os.path.dirname(log_path) or '.'}: starting from scratch; the previous log.txt "
              "is now log.txt.old")


def write_json_lines(path: str, records: Sequence[Dict[str, Any]]) -> None:
    """Rewrite a JSON-lines file atomically (checkpointing.atomic_write)."""
    checkpointing.atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records), mode="w")


# The curves a DINO researcher looks at first, in this order; other numeric keys follow.
# Then the training-health signals (health.py): the paper's two parts of the loss, prototypes in use, feature
# spread and RankMe.
CURVE_KEYS = ("train_loss", "knn_top1", "train_teacher_entropy", "train_kl", "train_prototypes_in_use",
              "train_feature_spread", "rankme", "train_lr", "train_wd", "train_teacher_momentum", "train_teacher_temp")
HEALTH_KEYS = ("train_teacher_entropy", "train_kl", "train_prototypes_in_use", "train_feature_spread", "rankme")


CURVE_SKIP = ("epoch", "bad_images", "train_bad_images")


# Panel titles a reader recognises at a glance (the log.txt key follows in brackets).
CURVE_TITLES = {"train_loss": "training loss", "knn_top1": "k-NN top-1 (%)", "knn_top5": "k-NN top-5 (%)",
                "test_acc1": "linear top-1 (%)", "test_acc5": "linear top-5 (%)", "train_lr": "learning rate",
                "train_wd": "weight decay", "train_teacher_momentum": "teacher momentum",
                "train_teacher_temp": "teacher temperature", "train_images_per_sec": "images/s",
                "train_teacher_entropy": "teacher entropy (nats)",
                "train_teacher_entropy_frac": "teacher entropy / ln K",
                "train_kl": "KL(teacher || student) (nats)", "train_prototypes_in_use": "prototypes in use",
                "train_feature_spread": "feature spread", "rankme": "RankMe (effective rank)"}


def read_log(path: str) -> List[Dict[str, Any]]:
    """The records of a log.txt (one JSON object per line); `path` may be the run's output folder.
    A line cut short by a crash is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
    if not os.path.isfile(path):
        raise utils.UserError(f"{path} does not exist: give a run's output folder or its log.txt")
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def plot_training_curves(log_paths, out_png: str, labels: Optional[Sequence[str]] = None,
                         keys: Optional[Sequence[str]] = None) -> Optional[str]:
    """Plot the numeric keys of one or several runs' log.txt against the epoch into one PNG.

    `log_paths`: a log.txt, an output folder, or a list of them (one line per run in every panel, one legend
    for the figure). Loss, k-NN accuracy, learning rate, weight decay, teacher momentum and temperature come
    first; `keys` plots only those of the given keys that some run has, in that order.
    Returns the PNG path, or None when there is nothing to plot or matplotlib is not installed.
    """
    if isinstance(log_paths, str):
        log_paths = [log_paths]
    runs = [read_log(p) for p in log_paths]
    if labels is None:
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) if p.endswith(".txt")
                  else os.path.basename(os.path.abspath(p)) for p in log_paths]
    found: List[str] = []
    for records in runs:
        for record in records:
            found += [k for k, v in record.items() if _is_number(v) and k not in CURVE_SKIP and k not in found]
    if keys is not None:
        keys = [k for k in keys if k in found]
    else:
        keys = [k for k in CURVE_KEYS if k in found] + [k for k in found if k not in CURVE_KEYS]
    if not keys:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no training-curve plot (pip install matplotlib)")
        return None
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    legend = 0.5 if len(runs) > 1 else 0.0  # inches on top for the one legend of several runs
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows + legend), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for ax, key in zip(axes.flat, keys):
        for i, (records, label) in enumerate(zip(runs, labels)):
            points = [(r.get("epoch", j), r[key]) for j, r in enumerate(records) if _is_number(r.get(key))]
            if points:  # a run keeps its colour in every panel, even where another run has no value
                handles[label], = ax.plot(*zip(*points), marker="o", markersize=3, label=label,
                                          color=colours[i % len(colours)])
        ax.set_title(f"{CURVE_TITLES[key]} ({key})" if key in CURVE_TITLES else key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if legend:
        shown = [label for label in labels if label in handles]
        fig.legend([handles[label] for label in shown], shown, loc="upper center", ncol=min(len(shown), 5),
                   frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - legend / fig.get_figheight()))
    try:  # atomically: a viewer refreshing the file never sees half of it
        checkpointing.atomic_write(out_png, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out_png


def duration(seconds: float) -> str:
    """`1 h 05 min`, `7 min 12 s`, `42 s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class RunClock:
    """The whole run's time on this machine, estimated twice: after the first few steps of this process (steps x
    the measured step time; the first `warmup` steps, slower, left out) and after its first epoch (epochs x the
    measured epoch, evaluation included). Timings in a README hold on the machine they were measured on; this says
    what they are on this one."""

    def __init__(self, iters_per_epoch: int, epochs: int, warmup: int = 2, measure: int = 5):
        self.iters_per_epoch, self.epochs, self.warmup, self.measure = iters_per_epoch, epochs, warmup, measure
        self.steps, self.started, self.step_estimated, self.epoch_estimated = 0, None, False, False

    def step_done(self, it: int) -> None:
        """After the optimizer step of global iteration `it` (every rank calls it; rank 0 prints)."""
        if self.step_estimated:
            return
        self.steps += 1
        if self.steps == self.warmup:
            self.started = time.time()
        elif self.started is not None and self.steps == self.warmup + self.measure:
            self.step_estimated = True
            per_step = (time.time() - self.started) / self.measure
            left = self.iters_per_epoch * self.epochs - it - 1
            print(f"Estimated time of this run on this machine: {duration(left * per_step)} of training for the "
                  f"{left} iterations left ({per_step:.3g} s each over iterations {it - self.measure + 2}-{it + 1}), "
                  "plus evaluation; again after the first epoch, evaluation included.")

    def epoch_done(self, epoch: int, train_stats: Dict[str, Any], other_stats: Dict[str, Any]) -> None:
        """After `epoch` and its evaluation (`other_stats` with `knn_time` when the online k-NN ran)."""
        if self.epoch_estimated or "epoch_time" not in train_stats or epoch + 1 >= self.epochs:
            return
        self.epoch_estimated = True
        train_s, eval_s = float(train_stats["epoch_time"]), float(other_stats.get("knn_time", 0.))
        left = self.epochs - epoch - 1
        total = left * (train_s + eval_s)
        finish = datetime.datetime.now() + datetime.timedelta(seconds=total)
        print(f"Estimated time left on this machine: {duration(total)} for {left} more epoch(s) of "
              f"{duration(train_s)} training" + (f" + {duration(eval_s)} evaluation" if eval_s else "") +
              f" each (epoch {epoch}'s), finishing about {finish:%H:%M}.")
