# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# init_distributed_mode, the rank helpers, fix_random_seeds and get_sha follow facebookresearch/dino's utils.py
# (Apache 2.0); their official names stay importable from utils.
"""The process: what every script does before, around and after its loop, and the decisions all ranks take
together.

- `UserError` (a message for the user, no traceback) and `TrainingInterrupted` (a signal, after the checkpoint);
  `run_script(main, args)` turns them into one line and an exit code, and ends a finished multi-process run.
- `init_distributed_mode(args)`: torchrun, a multi-task SLURM job, or one process; the rank helpers.
- `setup_run(args)`: processes, flags that agree across ranks, seeds, data workers, GPU math settings and a
  writable output folder, checked before any training.
- `precision_setup(device, use_fp16, amp_dtype)`: the autocast context, the gradient scaler and a description.
- `raise_together(error)`: a decision that stops a run, taken by every rank at the same point, so that no rank
  is left waiting in a collective for one that stopped; `check_same_on_all_ranks`, `barrier`.
- `StopSignals`: SIGTERM, SIGINT and SIGUSR2 (SLURM's pre-timeout and preemption signal) become a request to
  stop after the current iteration, agreed by every rank (engine.Run then checkpoints the exact position).

Imports torch and the standard library only: every other module of ours may import this one.
"""
import argparse
import atexit
import builtins
import contextlib
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist


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


def bool_flag(s: str) -> bool:
    """Parse boolean arguments from the command line."""
    FALSY_STRINGS = {"off", "false", "0"}
    TRUTHY_STRINGS = {"on", "true", "1"}
    if s.lower() in FALSY_STRINGS:
        return False
    elif s.lower() in TRUTHY_STRINGS:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag (use true/false, on/off or 1/0)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The distributed flags every script takes (official names)."""
    parser.add_argument("--dist_url", default="env://", type=str, help="""url used to set up
        distributed training; see https://pytorch.org/docs/stable/distributed.html""")
    parser.add_argument('--dist_timeout', default=30, type=float,
                        help='Minutes a collective may wait for the other processes before failing.')
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored: set by older launchers; the local rank comes from the environment.")


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


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set args.rank, args.world_size, args.gpu (local rank) and args.device; start a process group if needed
    (flags of `add_distributed_args`).

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
        init_method = args.dist_url or "env://"
        dist.init_process_group(backend=backend, init_method=init_method, world_size=args.world_size,
                                rank=args.rank, timeout=datetime.timedelta(minutes=float(args.dist_timeout)),
                                device_id=args.device if use_cuda else None)
        print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {init_method}", flush=True)
        dist.barrier()
    setup_for_distributed(args.rank == 0)
    if args.world_size == 1:
        print(f"Running as a single process on {args.device}.")


def fix_random_seeds(seed: int = 31) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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


def print_run_info(args: argparse.Namespace) -> None:
    """The code version and every flag, at the top of a run's output (as the official scripts print them)."""
    print("git:\n  {}\n".format(get_sha()))
    print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(10, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def check_output_dir(path: str) -> None:
    """Create `path` and check that it is writable, before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output_dir {path} is not writable: {e}") from None


def setup_run(args: argparse.Namespace, writes_output: bool = True, deterministic: bool = False) -> None:
    """What every training script does first: processes, seeds, data workers (`--num_workers` None: one per
    CPU, at most 10), the flags in the log, GPU math settings (TF32, or `deterministic` kernels) and (when it
    `writes_output`) a writable output folder, checked before any training, by rank 0 and agreed by all."""
    if deterministic:
        # deterministic cuBLAS workspaces; read when the first GPU matrix product sets them up, so set it now
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    init_distributed_mode(args)
    per_rank = {"rank", "gpu", "local_rank", "device", "dist_url"}
    check_same_on_all_ranks({k: str(v) for k, v in vars(args).items() if k not in per_rank}, "their flags")
    fix_random_seeds(args.seed + args.rank)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    print_run_info(args)
    gpu_math_setup(deterministic)
    if writes_output:
        error = None
        if is_main_process():
            try:
                check_output_dir(args.output_dir)
            except UserError as e:
                error = str(e)
        raise_together(error)


def gpu_math_setup(deterministic: bool = False) -> None:
    """TF32 tensor cores for the fp32 matrix products and convolutions (evaluation, the fp32 loss regions, fp32
    training; 10-bit mantissa products with fp32 accumulation, as the official code got by default before
    PyTorch 1.12) and cudnn.benchmark; or, with `deterministic`, deterministic kernels: no autotuning, no TF32,
    torch.use_deterministic_algorithms (ops that have no deterministic CUDA kernel warn rather than stop)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        print("--deterministic: deterministic kernels, no cudnn autotuning, no TF32 (slower).")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    """--use_fp16 and --amp_dtype, read by `precision_setup` (details in docs/performance.md)."""
    parser.add_argument('--use_fp16', type=bool_flag, default=True, help="""Whether or not to use mixed
        precision (autocast, see --amp_dtype; weights, optimizer state and trained heads stay fp32).""")
    parser.add_argument('--amp_dtype', default='auto', choices=['auto', 'bf16', 'fp16'], help="""With
        --use_fp16. auto: bf16 on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU. bf16: also
        on CPU (fast with AVX512-BF16 or AMX, slow elsewhere). fp16: GPU only.""")


class Precision(NamedTuple):
    """`precision_setup`'s answer: `autocast()` opens the autocast region, `scaler` is the fp16 GradScaler or
    None, `description` says what was chosen."""
    autocast: Callable[[], Any]
    scaler: Optional[torch.amp.GradScaler]
    description: str


def precision_setup(device: torch.device, use_fp16: bool, amp_dtype: str = "auto") -> Precision:
    """The autocast context factory, GradScaler or None, and a description for `--use_fp16` and `--amp_dtype`.

    auto: bf16 autocast on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU. bf16: bf16 autocast
    on any device (on CPU it pays only with native bf16). fp16: GPU only. Weights, optimizer state, the loss's
    centre and the EMA stay fp32 whatever the precision: autocast runs the matrix products in the low precision."""
    if not use_fp16:
        return Precision(contextlib.nullcontext, None, "fp32 (--use_fp16 false)")
    if device.type != "cuda":
        native = cpu_has_native_bf16()
        if not cpu_bf16(device, use_fp16, amp_dtype):
            return Precision(contextlib.nullcontext, None, "fp32 (CPU; --amp_dtype bf16 would use this CPU's "
                             "native bf16)" if native else "fp32 (CPU)")
        return Precision(lambda: torch.autocast(device.type, dtype=torch.bfloat16), None,
                         f"bf16 autocast on {device.type.upper()}" + ("" if native else " (emulated: this CPU has "
                         "no AVX512-BF16 or AMX, so it is slower than fp32; --amp_dtype auto is fp32)"))
    # including_emulation=False: V100/T4 emulate bf16 slowly; auto then takes fp16, as the official code does
    use_bf16 = amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported(including_emulation=False))
    dtype = torch.bfloat16 if use_bf16 else torch.float16
    return Precision(lambda: torch.autocast("cuda", dtype=dtype), None if use_bf16 else torch.amp.GradScaler("cuda"),
                     f"{'bf16' if use_bf16 else 'fp16 with gradient scaler'} autocast")


def cpu_bf16(device: torch.device, use_fp16: bool, amp_dtype: str) -> bool:
    """Whether `precision_setup` trains in bf16 autocast on a CPU: only when asked for by name (auto is fp32 there).
    The one rule for the checks that only concern that case (backbones.check_cpu_bf16_convolutions)."""
    return device.type != "cuda" and use_fp16 and amp_dtype == "bf16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_CPU_GROUP: Dict[str, Any] = {}


def cpu_group():
    """A gloo group of all ranks for small CPU-side agreements (the world itself when it is gloo). Created on
    first use, which every rank reaches at the same point (it is only used inside collectives)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    world = dist.group.WORLD
    if _CPU_GROUP.get("world") is not world:
        _CPU_GROUP.update(world=world, group=dist.new_group(backend="gloo"))
    return _CPU_GROUP["group"]


def raise_together(error: Optional[str]) -> None:
    """A decision that stops a run, taken by all ranks together. Every rank calls this at the same point with
    its own verdict (None: all is well); when any rank has an error, every rank raises the same UserError (the
    lowest such rank's message), so that no rank is left waiting in a collective for one that stopped (until
    --dist_timeout under srun). One small all-reduce on a gloo group (no GPU synchronisation)."""
    if not is_dist_avail_and_initialized() or dist.get_world_size() == 1:
        if error:
            raise UserError(error)
        return
    group = cpu_group()
    flag = torch.tensor([1 if error else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, error, group=group)
    rank, message = next((r, m) for r, m in enumerate(messages) if m)
    raise UserError(message if rank == 0 else f"{message} (found by rank {rank})")


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


def union_over_ranks(items: List[str]) -> List[str]:
    """The sorted union of every rank's `items` (e.g. the unreadable images each met; one collective)."""
    if not is_dist_avail_and_initialized() or dist.get_world_size() == 1:
        return sorted(set(items))
    gathered: List[List[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return sorted({item for rank_items in gathered for item in rank_items})


def barrier() -> None:
    """Every rank reaches this point before any goes on (nothing to wait for in a single process)."""
    if is_dist_avail_and_initialized():
        dist.barrier()


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
            self.group = cpu_group()

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
            print_all_ranks(f"Received {signal.Signals(signum).name}: finishing this iteration, then "
                            "writing a checkpoint and stopping (Ctrl-C again to stop at once).")
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank received (0 if none), the same on every rank."""
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def interrupted(self, signum: int, where: str, checkpoint_path: str) -> TrainingInterrupted:
        return TrainingInterrupted(
            signum, f"Stopped by {signal.Signals(signum).name} {where}; the checkpoint {checkpoint_path} holds "
            "this exact position: run the same command again to resume there.", self.previous.get(signum))


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
        # Every rank reaches the end before any leaves: gloo can abort a rank whose peer has gone.
        sys.stdout.flush()
        sys.stderr.flush()
        dist.barrier()
        leave_without_finalization(0)


def leave_without_finalization(code: int) -> None:
    """The end of a finished multi-process run: what a normal exit does for Python (non-daemon threads joined,
    atexit handlers, stdio flushed), then the process ends without the interpreter's finalisation, in which a
    communication thread that asks for the GIL aborts the process (docs/reliability.md). Every collective is
    done, so the process group need not be torn down: the operating system closes its connections."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # private, but stable since Python 3.0: the handlers a normal exit runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave_without_finalization_at_exit() -> None:
    """For a finished multi-process run whose process another framework ends (submitit writes the result after
    the script returns): at interpreter exit, leave as `run_script` does, without finalisation, where a gloo
    thread can abort or hang a finished job (docs/reliability.md). Exit code 0: call it on success only."""
    if not is_dist_avail_and_initialized():
        return

    def leave() -> None:
        atexit.unregister(leave)
        leave_without_finalization(0)  # runs the other atexit handlers first
    atexit.register(leave)


def _exit(code: int) -> None:
    """Leave after an error: in a multi-process run at once, since the other ranks may be gone or inside a
    collective, where tearing the process group down can hang or abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    if is_dist_avail_and_initialized():
        os._exit(code)
    sys.exit(code)
