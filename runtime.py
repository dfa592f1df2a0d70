# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""What every script does before and around its loop, and the decisions all ranks take together.

- `setup_run(args)`: processes and devices, the flags checked to agree across ranks, seeds, data workers, GPU
  math settings (TF32, or `--deterministic`) and a writable output folder, checked before any training.
- `precision_setup(device, use_fp16, amp_dtype)`: the autocast context, the gradient scaler and a description;
  `cpu_bf16(...)`: whether that is bf16 on a CPU.
- `raise_together(error)`: a decision that stops a run, taken by every rank at the same point, so that no rank
  is left waiting in a collective for one that stopped (until --dist_timeout under srun).
- `StopSignals`: SIGTERM, SIGINT and SIGUSR2 (SLURM's pre-timeout and preemption signal) become a request to
  stop after the current iteration, agreed by every rank (engine.Run then checkpoints the exact position).
"""
import argparse
import contextlib
import os
import signal
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import utils


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(10, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))

def precision_setup(device: torch.device, use_fp16: bool, amp_dtype: str = "auto") -> Tuple[Callable, Any, str]:
    """(autocast context factory, GradScaler or None, description) for `--use_fp16` and `--amp_dtype` on `device`.

    auto: bf16 autocast on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU. bf16: bf16 autocast
    on any device (on CPU it pays only with native bf16). fp16: GPU only. Weights, optimizer state, the loss's
    centre and the EMA stay fp32 whatever the precision: autocast runs the matrix products in the low precision."""
    if not use_fp16:
        return contextlib.nullcontext, None, "fp32 (--use_fp16 false)"
    if device.type != "cuda":
        native = cpu_has_native_bf16()
        if not cpu_bf16(device, use_fp16, amp_dtype):
            return contextlib.nullcontext, None, \
                "fp32 (CPU; --amp_dtype bf16 would use this CPU's native bf16)" if native else "fp32 (CPU)"
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None, \
            f"bf16 autocast on {device.type.upper()}" + ("" if native else
            " (emulated: this CPU has no AVX512-BF16 or AMX, so it is slower than fp32; --amp_dtype auto is fp32)")
    # including_emulation=False: V100/T4 emulate bf16 slowly; auto then takes fp16, as the official code does
    use_bf16 = amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported(including_emulation=False))
    dtype = torch.bfloat16 if use_bf16 else torch.float16
    scaler = None if use_bf16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, \
        f"{'bf16' if use_bf16 else 'fp16 with gradient scaler'} autocast"

def cpu_bf16(device: torch.device, use_fp16: bool, amp_dtype: str) -> bool:
    """Whether `precision_setup` trains in bf16 autocast on a CPU: only when asked for by name (auto is fp32 there).
    The one rule for the checks that only concern that case (backbones.check_input_sizes)."""
    return device.type != "cuda" and use_fp16 and amp_dtype == "bf16"

def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

def check_output_dir(path: str) -> None:
    """Create `path` and check that it is writable, before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise utils.UserError(f"--output_dir {path} is not writable: {e}") from None

def setup_run(args: argparse.Namespace, writes_output: bool = True) -> None:
    """What every training script does first: processes, seeds, data workers, the flags in the log, GPU math
    settings (TF32, or --deterministic) and (when it `writes_output`) a writable output folder, checked before
    any training, by rank 0 and agreed by all (so that no rank is left waiting for one that stopped)."""
    deterministic = getattr(args, "deterministic", False)
    if deterministic:
        # deterministic cuBLAS workspaces; read when the first GPU matrix product sets them up, so set it now
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    utils.init_distributed_mode(args)
    per_rank = {"rank", "gpu", "local_rank", "device", "dist_url"}
    utils.check_same_on_all_ranks({k: str(v) for k, v in vars(args).items() if k not in per_rank}, "their flags")
    utils.fix_random_seeds(args.seed + args.rank)
    if getattr(args, "num_workers", 0) is None:
        args.num_workers = default_num_workers()
    print("git:\n  {}\n".format(utils.get_sha()))
    print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))
    gpu_math_setup(deterministic)
    error = None
    if writes_output and utils.is_main_process():
        try:
            check_output_dir(args.output_dir)
        except utils.UserError as e:
            error = str(e)
    if writes_output:
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
    if not utils.is_dist_avail_and_initialized() or dist.get_world_size() == 1:
        if error:
            raise utils.UserError(error)
        return
    group = cpu_group()
    flag = torch.tensor([1 if error else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, error, group=group)
    rank, message = next((r, m) for r, m in enumerate(messages) if m)
    raise utils.UserError(message if rank == 0 else f"{message} (found by rank {rank})")

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
