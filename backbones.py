# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Names and signatures of the official helpers follow facebookresearch/dino's utils.py (Apache 2.0).
"""Plumbing shared by the scripts: distributed set-up, schedules, gradients, logging, checkpoints,
the multi-crop wrapper and backbone construction.

Imports torch, numpy and the standard library at the top; anything else (torchvision, timm, matplotlib)
lazily, inside the function that needs it.
"""
import argparse
import builtins
import contextlib
import datetime
import difflib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time
import warnings
from collections import defaultdict, deque
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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
        dist.destroy_process_group()  # left to interpreter exit, its teardown can abort or hang


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


def precision_setup(device: torch.device, use_fp16: bool, amp_dtype: str = "auto") -> Tuple[Callable, Any, str]:
    """(autocast context factory, GradScaler or None, description) for `--use_fp16` and `--amp_dtype` on `device`.

    auto: bf16 autocast on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU. bf16: bf16 autocast
    on any device (on CPU it pays only with native bf16). fp16: GPU only. Weights, optimizer state, the loss's
    centre and the EMA stay fp32 whatever the precision: autocast runs the matrix products in the low precision."""
    if not use_fp16:
        return contextlib.nullcontext, None, "fp32 (--use_fp16 false)"
    if device.type != "cuda":
        native = cpu_has_native_bf16()
        if amp_dtype != "bf16":
            return contextlib.nullcontext, None, \
                "fp32 (CPU; --amp_dtype bf16 would use this CPU's native bf16)" if native else "fp32 (CPU)"
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None, \
            f"bf16 autocast on {device.type.upper()}" + ("" if native else
            " (emulated: this CPU has no AVX512-BF16 or AMX, so it is slower than fp32; --amp_dtype auto is fp32)")
    use_bf16 = amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if use_bf16 else torch.float16
    scaler = None if use_bf16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, \
        f"{'bf16' if use_bf16 else 'fp16 with gradient scaler'} autocast"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def save_on_master(obj: Any, f: str) -> None:
    """Write `obj` to `f` atomically, from the master process only."""
    if is_main_process():
        save_checkpoint(obj, f)


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


def get_rng_state() -> Dict[str, Any]:
    """The RNG state of this process, to store in a checkpoint (loads with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": list(_flatten_py_state(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"][0], tuple(state["python"][1:-1]), state["python"][-1]
    random.setstate((version, internal, None if gauss == "None" else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _flatten_py_state(st: tuple) -> Iterable:
    version, internal, gauss = st
    return [version, *internal, "None" if gauss is None else gauss]


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
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm `clip` (per parameter, as the official DINO code does).

    Returns the norms before clipping as a 1-D tensor (no host-device synchronisation).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2)])
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
        outputs, start = [], 0
        while start < len(x):
            end = start + 1
            while end < len(x) and x[end].shape[-2:] == x[start].shape[-2:]:
                end += 1
            out = self.backbone(torch.cat(x[start:end]) if end - start > 1 else x[start], **kwargs)
            if isinstance(out, tuple):  # e.g. XCiT returns a tuple
                out = out[0]
            outputs.append(out)
            start = end
        return self.head(torch.cat(outputs) if len(outputs) > 1 else outputs[0])


VIT_ARCHS = ("vit_nano", "vit_tiny", "vit_small", "vit_base", "vit_large")
DEIT_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small", "deit_base": "vit_base"}


def torchvision_archs() -> List[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _strip_torchvision_classifier(model: nn.Module) -> int:
    """Replace the last Linear of a torchvision classifier by Identity; return its input width."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linears:
                in_features = head[linears[-1]].in_features
                head[linears[-1]] = nn.Identity()
                return in_features
    raise UserError(f"cannot find the classifier of torchvision model {type(model).__name__} to replace")


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.,
                   **vit_kwargs) -> Tuple[nn.Module, int]:
    """Backbone without classifier, and its feature width, for `--arch`.

    Our ViTs (vit_nano/tiny/small/base/large, and the official deit_* aliases), any torchvision classification
    model, or any timm model name. Never downloads weights.
    """
    import vision_transformer as vits
    arch = DEIT_ALIASES.get(arch, arch)
    if arch in VIT_ARCHS:
        model = getattr(vits, arch)(patch_size=patch_size, drop_path_rate=drop_path_rate, **vit_kwargs)
        return model, model.embed_dim
    tv_archs = torchvision_archs()
    if arch in tv_archs:
        import torchvision
        model = torchvision.models.get_model(arch, weights=None)
        return model, _strip_torchvision_classifier(model)
    import timm
    if timm.is_model(arch):
        # dynamic_img_size lets timm ViTs take the local crops; drop_path_rate where the model has one.
        # Meta's DINOv3 models output the normalised CLS token; timm's ports default to average pooling.
        pool = {"global_pool": "token"} if "dinov3" in arch else {}
        for extra in ({"drop_path_rate": drop_path_rate, "dynamic_img_size": True},
                      {"drop_path_rate": drop_path_rate}, {}):
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=0, **pool, **extra)
                break
            except TypeError:
                continue
        return model, model.num_features
    candidates = list(VIT_ARCHS) + list(DEIT_ALIASES) + tv_archs
    close = difflib.get_close_matches(arch, candidates + timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown --arch {arch!r}: use one of {', '.join(VIT_ARCHS)}, a torchvision classification "
                    f"model (e.g. resnet50) or a timm model name (timm.list_models()).{hint}")


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(obj: Any, path: str) -> None:
    """Atomic save: temporary file in the same folder, fsync, rename. A crash never destroys `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # A full disk surfaces as OSError, or as RuntimeError from torch's zip writer.
        if isinstance(e, (OSError, RuntimeError)):
            raise UserError(f"could not write checkpoint {path}: {_first_line(e)}. The previous checkpoint, if "
                            "any, is intact; free disk space or choose another --output_dir, then rerun to "
                            "resume") from None
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temporaries(directory: str) -> None:
    """Remove the temporary files of checkpoint writes that a killed process left in `directory`."""
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = re.fullmatch(r"\..+\.tmp(\d+)", name)
        if match and not _process_alive(int(match.group(1))):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from no write in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; official checkpoints need argparse.Namespace, allowed alone."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # files written with pickle.dump rather than torch.save: the refusal below says all there is to say
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and styled; keep the line that names the refused object.
        refused = [line for line in str(e).splitlines() if "Unsupported global" in line]
        detail = _first_line(refused[0] if refused else e)
        raise UserError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                        f"containers ({detail}). Only load checkpoints you trust; if you do, convert it "
                        "to a state_dict first") from None
    except Exception as e:  # corrupt, truncated, or not a checkpoint at all
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                        f"{type(e).__name__}: {_first_line(e)}") from None


def _first_line(message) -> str:
    """First line of an exception's (or a string's) message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message)).strip()
    return text.splitlines()[0] if text else type(message).__name__


def match_state_dict_prefix(state_dict: Dict[str, Any], module: nn.Module) -> Dict[str, Any]:
    """Add or strip the DDP `module.` prefix so that `state_dict` matches `module`'s keys."""
    target = list(module.state_dict().keys())
    keys = list(state_dict.keys())
    if not keys or not target:
        return state_dict
    src_ddp = all(k.startswith("module.") for k in keys)
    dst_ddp = all(k.startswith("module.") for k in target)
    if src_ddp and not dst_ddp:
        return {k[len("module."):]: v for k, v in state_dict.items()}
    if dst_ddp and not src_ddp:
        return {"module." + k: v for k, v in state_dict.items()}
    return state_dict


def restart_from_checkpoint(ckp_path: str, run_variables: Optional[Dict[str, Any]] = None,
                            check: Optional[Callable[[dict], None]] = None, **kwargs) -> Optional[dict]:
    """Load each `name=object` from the checkpoint at `ckp_path` (if it exists) into `object`.

    Modules load strictly (the DDP `module.` prefix is adapted); a mismatch stops with a message naming
    the file and the keys. `run_variables` entries present in the checkpoint are overwritten. Returns
    the checkpoint dict, or None if there is none. `check(checkpoint)` may refuse it (raise) before anything
    is loaded.
    """
    if not os.path.isfile(ckp_path):
        return None
    print(f"Found checkpoint at {ckp_path}")
    checkpoint = load_checkpoint(ckp_path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{ckp_path} is not a training checkpoint (expected a dict, found {type(checkpoint).__name__})")
    if check is not None:
        check(checkpoint)
    for key, value in kwargs.items():
        if value is None:
            continue
        if key not in checkpoint:
            print(f"=> key '{key}' not found in checkpoint '{ckp_path}'")
            continue
        try:
            if isinstance(value, nn.Module):
                value.load_state_dict(match_state_dict_prefix(checkpoint[key], value), strict=True)
            else:
                value.load_state_dict(checkpoint[key])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {ckp_path} does not match this run's '{key}': {e}\n"
                            "Use the flags of the run that wrote it (--arch, --patch_size, --out_dim, ...) "
                            "or another --output_dir") from None
        print(f"=> loaded '{key}' from checkpoint '{ckp_path}'")
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]
    return checkpoint


def select_state_dict(checkpoint: Any, checkpoint_key: Optional[str], path: str) -> Dict[str, torch.Tensor]:
    """The weights to evaluate inside a loaded checkpoint: `checkpoint[checkpoint_key]` for a full training
    checkpoint (ours or official), or the file itself when it is already a state_dict (official
    `*_pretrain.pth`, torchvision, timm and Meta DINOv3 files)."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict or a training checkpoint")
    is_state_dict = all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    if checkpoint_key and checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], dict):
        print(f"Take key {checkpoint_key} in provided checkpoint dict")
        return checkpoint[checkpoint_key]
    if is_state_dict:
        return checkpoint
    for key in ("model", "state_dict", "model_ema"):  # common wrappers (DeiT, Lightning, ...)
        if isinstance(checkpoint.get(key), dict):
            print(f"Take key {key} in provided checkpoint dict")
            return checkpoint[key]
    dict_keys = [k for k, v in checkpoint.items() if isinstance(v, dict)]
    raise UserError(f"{path} has no key {checkpoint_key!r}: use --checkpoint_key with one of "
                    f"{', '.join(dict_keys) or '(none: the file holds no weights)'}")


def _timm_convert(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Run timm's own converter for `model`'s family (e.g. Meta DINOv3 keys to timm's Eva keys)."""
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is None:
        return state_dict
    blocks = getattr(model, "blocks", None)
    # timm's EvaAttention always has a `q_bias` attribute: None when the model has no qkv bias
    if "storage_tokens" in state_dict and blocks is not None and getattr(blocks[0].attn, "q_bias", None) is None:
        # timm drops qkv biases for models built without them (Meta's distilled ViTs have zero biases);
        # silently dropping non-zero ones would change the features. Meta never uses the k third
        # (`bias_mask` is 0 there), so only the q and v biases count.
        biases = [v * state_dict[k + "_mask"] if k + "_mask" in state_dict else v
                  for k, v in state_dict.items() if k.endswith("attn.qkv.bias")]
        if any(b.float().abs().max() > 0 for b in biases):
            raise UserError("this DINOv3 checkpoint has non-zero qkv biases, which the chosen timm model lacks: "
                            "use the `_qkvb` variant of --arch (e.g. vit_small_patch16_dinov3_qkvb)")
        # zero: drop them here (timm would print "`q_bias` is not an nn.Parameter" once per block)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("attn.qkv.bias")}
    return convert(state_dict, model)


def local_weights_path(path_or_url: str) -> str:
    """A local path for `path_or_url`: an http(s) URL is downloaded once into torch.hub's cache."""
    if not path_or_url.startswith(("http://", "https://")):
        return path_or_url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(path_or_url.split("?")[0]))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(path_or_url, path)
    return path


def load_pretrained_weights(model: nn.Module, pretrained_weights: str, checkpoint_key: Optional[str] = "teacher",
                            model_name: Optional[str] = None, patch_size: Optional[int] = None) -> None:
    """Load backbone weights for evaluation, without ever downloading unless given a URL.

    Reads our `main_dino.py`/`main_distill.py` checkpoints (`checkpoint_key` teacher or student), official
    full checkpoints and backbone-only `*_pretrain.pth` files (`module.`/`backbone.` prefixes stripped,
    projection-head weights ignored), torchvision and timm state_dicts, and Meta's DINOv3 files (through
    timm's converter). Missing weights or shapes that do not match stop with one message; unexpected
    extra weights are listed. No `pretrained_weights`: random weights, with a loud warning.
    """
    if not pretrained_weights:
        name = f"{model_name or type(model).__name__}" + (f" (patch size {patch_size})" if patch_size else "")
        bar = "!" * 100
        print(f"{bar}\nWARNING: no --pretrained_weights given: evaluating a RANDOMLY INITIALISED {name}.\n"
              "Nothing is downloaded. Pass the path of a checkpoint (ours, official DINO, torchvision, timm or "
              f"Meta DINOv3) to evaluate trained weights.\n{bar}")
        return
    path = local_weights_path(pretrained_weights)  # only a URL the user gave explicitly is downloaded
    state_dict = select_state_dict(load_checkpoint(path), checkpoint_key, path)
    # official conventions: DDP `module.` and MultiCropWrapper `backbone.` prefixes
    state_dict = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state_dict.items()}
    state_dict = {k.replace("backbone.", "", 1) if k.startswith("backbone.") else k: v for k, v in state_dict.items()}
    model_state = model.state_dict()
    if type(model).__module__.startswith("timm.") and any(k not in model_state for k in state_dict):
        state_dict = _timm_convert(state_dict, model)
    # Weights of other modules saved beside the backbone (the DINO projection head, iBOT heads, the CLS
    # projection of main_distill.py, classifiers replaced by Identity, the iBOT mask token) are not part of
    # the backbone; keys under the model's own top-level names that it lacks are real mismatches.
    top_level = {k.split(".")[0] for k in model_state}
    ignored = sorted(k for k in state_dict if k not in model_state and k.split(".")[0] not in top_level)
    state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]

    def listing(keys: List[str]) -> str:
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    if missing or mismatched:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} with other shapes ({listing(mismatched)})")
        if missing:
            problems.append(f"{len(missing)} missing ({listing(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} not in the model ({listing(unexpected)})")
        raise UserError(f"{path} does not fit {model_name or type(model).__name__}: of its weights, "
                        f"{'; '.join(problems)}. Check --arch, --patch_size and --checkpoint_key against the "
                        "run that wrote it")
    model.load_state_dict(state_dict, strict=False)
    message = f"Pretrained weights found at {path} and loaded: {len(state_dict) - len(unexpected)} tensors"
    if ignored:
        others = sorted({k.split(".")[0] for k in ignored})
        message += f"; ignored {len(ignored)} tensors of other modules ({', '.join(others)})"
    print(message)
    if unexpected:
        print(f"WARNING: {len(unexpected)} weights of {path} are not used by the model: {listing(unexpected)}")


def load_head_weights(head: nn.Module, pretrained_weights: str, checkpoint_key: Optional[str],
                      prefix: str = "head.") -> bool:
    """Load the weights under `prefix` of a checkpoint (e.g. the DINO projection head of a main_dino.py
    teacher: `head.*`) into `head`. Returns False, saying why, when the checkpoint has none or they do not
    fit (other out_dim, layers or widths)."""
    path = local_weights_path(pretrained_weights)
    state_dict = select_state_dict(load_checkpoint(path), checkpoint_key, path)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not found:
        print(f"{path} holds no '{prefix}*' weights")
        return False
    expected = head.state_dict()
    mismatch = sorted(set(found) ^ set(expected)) + [k for k in found if k in expected and found[k].shape != expected[k].shape]
    if mismatch:
        print(f"the '{prefix}*' weights of {path} do not fit this head ({', '.join(mismatch[:4])}...)")
        return False
    head.load_state_dict(found, strict=True)
    print(f"Loaded the '{prefix}*' weights of {path}")
    return True


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and values): identifies them in a checkpoint."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def sync_log_with_checkpoint(log_path: str, log_history: Optional[Sequence[Dict[str, Any]]]) -> None:
    """Make log.txt hold exactly the epochs of the checkpoint a run resumes from (`log_history`; none lost,
    none repeated), or, when starting without a checkpoint (`log_history` None), move a stale log.txt,
    which belongs to another run, aside to log.txt.old rather than append to it. Main process only."""
    if not is_main_process():
        return
    if log_history is not None:
        write_json_lines(log_path, log_history)
    elif os.path.exists(log_path):
        os.replace(log_path, log_path + ".old")
        print(f"No checkpoint in {os.path.dirname(log_path) or '.'}: starting from scratch; the previous log.txt "
              "is now log.txt.old")


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


def write_json_lines(path: str, records: Sequence[Dict[str, Any]]) -> None:
    """Rewrite a JSON-lines file atomically (temporary file, then rename)."""
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The curves a DINO researcher looks at first, in this order; other numeric keys follow.
CURVE_KEYS = ("train_loss", "knn_top1", "train_lr", "train_wd", "train_teacher_momentum", "train_teacher_temp")
CURVE_SKIP = ("epoch", "bad_images", "train_bad_images")
# Panel titles a reader recognises at a glance (the log.txt key follows in brackets).
CURVE_TITLES = {"train_loss": "training loss", "knn_top1": "k-NN top-1 (%)", "knn_top5": "k-NN top-5 (%)",
                "test_acc1": "linear top-1 (%)", "test_acc5": "linear top-5 (%)", "train_lr": "learning rate",
                "train_wd": "weight decay", "train_teacher_momentum": "teacher momentum",
                "train_teacher_temp": "teacher temperature", "train_images_per_sec": "images/s"}


def read_log(path: str) -> List[Dict[str, Any]]:
    """The records of a log.txt (one JSON object per line); `path` may be the run's output folder.
    A line cut short by a crash is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give a run's output folder or its log.txt")
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    tmp = f"{out_png}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)  # a viewer refreshing the file never sees half of it
    return out_png
