# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Names and signatures of the official helpers follow facebookresearch/dino's utils.py (Apache 2.0).
"""The official DINO helpers (same names and signatures): distributed set-up, seeds, schedules, gradients,
the multi-crop wrapper, metric logging; and the errors a user can cause, with `run_script` turning them into
one line and an exit code. Code written against the official `utils.py` keeps working with `import utils`.

Imports torch, numpy and the standard library only; `checkpointing` (which builds on this module) inside the
three official checkpoint helpers that forward to it.
"""
import argparse
import atexit
import builtins
import datetime
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


# ----------------------------------------------------------------------------------------------------
# Errors a user can cause
# ----------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An error the user can fix (bad path, flag, file): scripts print its message alone, no traceback."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT, SIGUSR2) after writing a checkpoint of its exact
    position; running the same command again resumes there. `previous_handler` is the handler that the
    signal had before training took it over (submitit's requeue handler in a SLURM job)."""

    def __init__(self, signum: int, message: str, previous_handler: Any = None):
        super().__init__(message)
        self.signum = signum
        self.previous_handler = previous_handler


def run_script(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run a script's `main(args)`, turning a UserError into one clear line on stderr and exit code 2, and
    a TrainingInterrupted into its message and the usual exit code of the signal (128 + number)."""
    rank = lambda: f"[rank {get_rank()}] " if get_world_size() > 1 else ""  # noqa: E731
    try:
        main(args)
    except UserError as e:
        sys.stderr.write(f"{rank()}error: {e}\n")
        _exit(2)
    except TrainingInterrupted as e:
        if is_main_process():
            sys.stderr.write(f"{e}\n")
        _exit(128 + e.signum)
    if is_dist_avail_and_initialized():
        # Every rank reaches the end before any leaves: a rank that leaves while another is still writing its
        # last files can make gloo abort that rank (SIGABRT, a failed job).
        sys.stdout.flush()
        sys.stderr.flush()
        dist.barrier()
        _leave_without_finalization(0)


def _leave_without_finalization(code: int) -> None:
    """The end of a finished multi-process run: what a normal exit does for Python (non-daemon threads joined,
    atexit handlers, stdio flushed), then the process ends without the interpreter's finalisation.

    A finished 2-process run once ended with SIGABRT in one rank ('terminate called without an active
    exception': a failed job after a successful run) after the barrier and destroy_process_group(); rare (one
    CI run; not seen again in 188 local repetitions). That message is the C++ runtime's when Python ends a native
    thread that asks for the GIL during finalisation, as a communication thread dropping its last tensor
    does; skipping finalisation leaves no such window. The process group is not destroyed either (one teardown
    path less): every collective is done (the barrier above), the operating system closes the connections,
    and a gloo peer takes a closed connection after its last collective (measured: a peer leaving with
    os._exit after the barrier leaves the other rank running and able to destroy its group)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # private, but stable since Python 3.0: the handlers a normal exit runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if is_dist_avail_and_initialized():
        # The other ranks may be gone or still inside a collective: tearing the process group down (here or at
        # interpreter exit) can hang or abort ("terminate called without an active exception"). Leave at once.
        os._exit(code)
    sys.exit(code)


def bool_flag(s: str) -> bool:
    """Parse boolean arguments from the command line."""
    FALSY_STRINGS = {"off", "false", "0"}
    TRUTHY_STRINGS = {"on", "true", "1"}
    if s.lower() in FALSY_STRINGS:
        return False
    elif s.lower() in TRUTHY_STRINGS:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag (use true/false, on/off or 1/0)")


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on every process but the master; `print(..., force=True)` always prints."""
    builtin_print = getattr(builtins.print, "_dino_original", builtins.print)

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    print._dino_original = builtin_print
    builtins.print = print


def print_all_ranks(*args, **kwargs) -> None:
    """print() on every rank, also where setup_for_distributed silenced it (e.g. this rank's bad files)."""
    getattr(builtins.print, "_dino_original", builtins.print)(*args, **kwargs)


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as `gpu[003-005,010],cpu7` (-> `gpu003`) or
    `r[1-2]n[01-04]` (-> `r1n01`)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())
    if not first or "[" in first or "]" in first:
        raise UserError(f"cannot parse SLURM node list {nodelist!r}")
    return first


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The distributed flags every script takes (official names)."""
    parser.add_argument("--dist_url", default="env://", type=str, help="""url used to set up
        distributed training; see https://pytorch.org/docs/stable/distributed.html""")
    parser.add_argument('--dist_timeout', default=30, type=float,
                        help='Minutes a collective may wait for the other processes before failing.')
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored: set by older launchers; the local rank comes from the environment.")


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set args.rank, args.world_size, args.gpu (local rank) and args.device; start a process group if needed.

    torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or a multi-task SLURM job (SLURM_PROCID/SLURM_NTASKS, master
    address from the node list, port from the job id) start a process group: NCCL on CUDA, gloo on CPU.
    Anything else (plain `python script.py`, a one-task SLURM job) runs as a single process with no group.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        if torch.cuda.is_available():  # --gpus-per-task=1 or --gpu-bind: each task sees its one GPU as device 0
            args.gpu %= torch.cuda.device_count()
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
        # A port derived from the job id: the same on every task, different between jobs sharing a node.
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        if args.gpu >= torch.cuda.device_count():
            raise UserError(f"local rank {args.gpu} has no GPU: only {torch.cuda.device_count()} visible; "
                            "start at most one process per GPU")
        torch.cuda.set_device(args.gpu)
        args.device = torch.device("cuda", args.gpu)
    else:
        args.device = torch.device("cpu")

    if args.world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        init_method = getattr(args, "dist_url", "env://") or "env://"
        timeout = datetime.timedelta(minutes=float(getattr(args, "dist_timeout", 30)))
        dist.init_process_group(backend=backend, init_method=init_method, world_size=args.world_size,
                                rank=args.rank, timeout=timeout,
                                device_id=args.device if use_cuda else None)
        print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {init_method}", flush=True)
        dist.barrier()
    setup_for_distributed(args.rank == 0)
    if args.world_size == 1:
        print(f"Running as a single process on {args.device}.")


def check_same_on_all_ranks(values: Dict[str, Any], what: str) -> None:
    """Stop, on every rank, when `values` differ between ranks (e.g. flags, or dataset sizes when a node sees
    another copy of the data): such a run would train something nobody asked for, or hang."""
    if not is_dist_avail_and_initialized():
        return
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, values)
    differing = sorted(k for k in values if any(g.get(k) != values[k] for g in gathered))
    if differing:
        details = "; ".join(f"{k}: " + ", ".join(f"rank {r}={g.get(k)!r}" for r, g in enumerate(gathered))
                            for k in differing[:5])
        raise UserError(f"the processes disagree on {what} ({details}): start every process with the same "
                        "command and the same data")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the official names, implemented in checkpointing.py
# ----------------------------------------------------------------------------------------------------
def save_on_master(obj: Any, f: str) -> None:
    """Write `obj` to `f` atomically, from the master process only (checkpointing.save_on_master)."""
    import checkpointing  # builds on this module, hence imported here
    checkpointing.save_on_master(obj, f)


def restart_from_checkpoint(ckp_path: str, run_variables: Optional[Dict[str, Any]] = None, **kwargs) -> Optional[dict]:
    """Load each `name=object` from the checkpoint at `ckp_path`, if it exists (checkpointing.restart_from_checkpoint)."""
    import checkpointing
    return checkpointing.restart_from_checkpoint(ckp_path, run_variables, **kwargs)


def load_pretrained_weights(model: nn.Module, pretrained_weights: str, checkpoint_key: Optional[str] = "teacher",
                            model_name: Optional[str] = None, patch_size: Optional[int] = None) -> None:
    """Load backbone weights of any origin into `model` (checkpointing.load_pretrained_weights)."""
    import checkpointing
    checkpointing.load_pretrained_weights(model, pretrained_weights, checkpoint_key, model_name, patch_size)


# ----------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------
def fix_random_seeds(seed: int = 31) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------------------------------
# Schedules and gradients
# ----------------------------------------------------------------------------------------------------
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration: linear warmup from `start_warmup_value`, then a cosine to `final_value`."""
    total = int(epochs * niter_per_ep)
    warmup_iters = min(int(warmup_epochs * niter_per_ep), total)
    warmup_schedule = np.array([])
    if warmup_iters > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == total
    return schedule


@torch.no_grad()
def grad_norms(model: nn.Module) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of `model`'s parameters and their norms, one per parameter, stacked on the device (no
    host-device synchronisation); ([], None) when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return grads, None
    return grads, torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2)])


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm `clip` (per parameter, as the official DINO code does).

    Returns the norms before clipping as a 1-D tensor (no host-device synchronisation).
    """
    grads, norms = grad_norms(model)
    if norms is None:
        return torch.zeros(0)
    clip_coefs = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(clip_coefs.unbind(0), grads)])
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def cancel_gradients_backbone(epoch: int, model: nn.Module, freeze_backbone_epochs: int) -> None:
    """Drop the gradients of the backbone (`backbone.*`, inside DDP `module.backbone.*`) during the first
    `freeze_backbone_epochs` epochs: the optimizer then leaves its weights and their moments untouched."""
    if epoch >= freeze_backbone_epochs:
        return
    for n, p in model.named_parameters():
        if n.startswith(("backbone.", "module.backbone.")):
            p.grad = None


def get_params_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """Two groups: weights (regularised) and biases/norm parameters (no weight decay)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of several resolutions.

    The backbone runs once per run of consecutive crops of the same size (batched together), the head
    once on all the features. Output rows are crop-major: all images of crop 0, then crop 1, ...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        # Disable layers dedicated to ImageNet label classification.
        if hasattr(backbone, "reset_classifier"):  # timm: keeps its pooling, drops the classifier
            backbone.reset_classifier(0)
        else:
            backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x, **kwargs) -> torch.Tensor:
        if not isinstance(x, (list, tuple)):
            x = [x]
        outputs = []
        for start, end in resolution_runs(x):
            out = self.backbone(torch.cat(x[start:end]) if end - start > 1 else x[start], **kwargs)
            if isinstance(out, tuple):  # e.g. XCiT returns a tuple
                out = out[0]
            outputs.append(out)
        return self.head(torch.cat(outputs) if len(outputs) > 1 else outputs[0])


def resolution_runs(crops: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """(start, end) of each run of consecutive crops with the same resolution: one backbone pass each."""
    runs, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        runs.append((start, end))
        start = end
    return runs


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------
class SmoothedValue:
    """Track a series of values; window median/average and global average.

    Accepts tensors without reading them: the host-device synchronisation happens only when a
    statistic is printed.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.deque.append(value)
        self.count += n
        self.total = self.total + value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, float(self.total)], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    def _values(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in self.deque], dtype=torch.float64)

    @property
    def median(self) -> float:
        return self._values().median().item()

    @property
    def avg(self) -> float:
        return self._values().mean().item()

    @property
    def global_avg(self) -> float:
        return float(self.total) / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(float(v) for v in self.deque)

    @property
    def value(self) -> float:
        return float(self.deque[-1])

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.meters:
            return self.meters[attr]
        if attr in self.__dict__:
            return self.__dict__[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Running totals and counts (what the epoch averages need), for a mid-epoch checkpoint."""
        return {k: {"total": m.total.cpu() if isinstance(m.total, torch.Tensor) else m.total, "count": m.count}
                for k, m in self.meters.items()}

    def load_state_dict(self, state: Dict[str, Dict[str, Any]]) -> None:
        for k, v in state.items():
            self.meters[k].total, self.meters[k].count = v["total"], v["count"]

    def log_every(self, iterable: Iterable, print_freq: int, header: Optional[str] = None,
                  images_per_iter: Optional[int] = None, total: Optional[int] = None, start: int = 0):
        """Yield from `iterable`, printing progress, ETA, iteration/data time (and images/s) every
        `print_freq` iterations and at the last one. `start`: the index of the first item (an epoch
        resumed in its middle)."""
        i = start
        header = header or ''
        total = len(iterable) if total is None else total
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        space_fmt = ':' + str(len(str(total))) + 'd'
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i - 1)
                parts = [header, ('[{0' + space_fmt + '}/{1}]').format(i, total),
                         f"eta: {datetime.timedelta(seconds=int(eta_seconds))}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if images_per_iter:
                    parts.append(f"img/s: {images_per_iter / max(iter_time.avg, 1e-9):.1f}")
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total - start, 1):.4f} s / it)", flush=True)


def get_sha() -> str:
    cwd = os.path.dirname(os.path.abspath(__file__))

    def _run(command):
        return subprocess.check_output(command, cwd=cwd, stderr=subprocess.DEVNULL).decode('ascii').strip()
    sha, diff, branch = 'N/A', "clean", 'N/A'
    try:
        sha = _run(['git', 'rev-parse', 'HEAD'])
        subprocess.check_output(['git', 'diff'], cwd=cwd, stderr=subprocess.DEVNULL)
        diff = "has uncommited changes" if _run(['git', 'diff-index', 'HEAD']) else "clean"
        branch = _run(['git', 'rev-parse', '--abbrev-ref', 'HEAD'])
    except Exception:
        pass
    return f"sha: {sha}, status: {diff}, branch: {branch}"
