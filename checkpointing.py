# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Checkpoints and weights: atomic save, safe load, the `module.`/`backbone.` prefixes, resume, loading
backbone weights of any origin (ours, official DINO, torchvision, timm, Meta DINOv3) and the RNG state.

Imports torch and the standard library at the top; timm's converters are reached through the model's module.
"""
import argparse
import os
import pickle
import random
import re
import secrets
import sys
import warnings
from typing import IO, Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from runtime import UserError, is_main_process


def strip_prefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """`state_dict` with `prefix` removed from the keys that start with it (e.g. DDP's `module.`)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def save_on_master(obj: Any, path: str) -> None:
    """Write `obj` to `path` atomically, from the master process only."""
    if is_main_process():
        atomic_save(obj, path)


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


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb", what: str = "file") -> None:
    """`write(f)` into a temporary file beside `path`, fsync, then rename: `path` is the old file or the new one,
    never half of either, whatever kills the process. Every file the project writes goes through here (bar the
    self-contained synthetic.py). The temporary name, `.NAME.tmpPID.XXXXXXXX`, is unique and names its writer,
    so that `remove_stale_temporaries` can tell a killed writer's leftovers from a write in progress. A write
    that fails (a full disk) stops with one message naming the file (`what` it is) and what to do."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # exclusive creation: unique even between hosts sharing the folder
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # A full disk surfaces as OSError, or as RuntimeError from torch's zip writer.
        if isinstance(e, (OSError, RuntimeError)):
            raise UserError(f"could not write {what} {path}: {_first_line(e)}. The previous {what}, if any, is "
                            "intact; free disk space or choose another --output_dir, then run the same command "
                            "again") from None
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str) -> None:
    """torch.save of `obj` to `path` through `atomic_write`: a crash never destroys the previous file."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags as a plain dict (numbers, strings, lists; anything else as its string), for a checkpoint that
    loads with weights_only=True and for the loggers' run configuration."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
            for k, v in vars(args).items()}


def remove_stale_temporaries(directory: str) -> None:
    """Remove the temporary files of `atomic_write` that a killed process left in `directory`."""
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = re.fullmatch(r"\..+\.tmp(\d+)(\.\w+)?", name)
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
        return strip_prefix(state_dict, "module.")
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


def dinov2_arch_of(state_dict: Dict[str, Any]) -> Optional[str]:
    """The --arch of a Meta DINOv2 backbone state_dict (LayerScale, /14 patches), e.g. `dinov2_vits14_reg4`;
    None for anything else."""
    patch = state_dict.get("patch_embed.proj.weight")
    if patch is None or patch.shape[-1] != 14 or "blocks.0.ls1.gamma" not in state_dict:
        return None
    size = {384: "s", 768: "b", 1024: "l", 1536: "g"}.get(patch.shape[0])
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    return f"dinov2_vit{size}14" + (f"_reg{registers}" if registers else "") if size else None


def vit_structure_mismatch(state_dict: Dict[str, Any], model_state: Dict[str, Any]) -> Optional[str]:
    """What a ViT state_dict and our ViT model differ in, in words (register tokens, LayerScale, the feed-forward,
    the patch size), with the --arch that fits a DINOv2 file; None when they agree on all four, when only the
    patch size of a file that is no DINOv2 file differs (the shape listing of the caller says it), or when either
    is no ViT of ours (no `blocks.0.norm1` and `patch_embed.proj` keys)."""
    keys = ("patch_embed.proj.weight", "blocks.0.norm1.weight")
    if not all(k in state_dict and k in model_state for k in keys):
        return None

    def parts(sd: Dict[str, Any]) -> Dict[str, Any]:
        return {"register tokens": sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
                "LayerScale": "yes" if "blocks.0.ls1.gamma" in sd else "no",
                "feed-forward": "SwiGLU (ViT-g)" if "blocks.0.mlp.w12.weight" in sd else "MLP",
                "patch size": sd["patch_embed.proj.weight"].shape[-1]}
    file, model = parts(state_dict), parts(model_state)
    differences = [f"{what}: {file[what]} in the file, {model[what]} in the model" for what in file
                   if file[what] != model[what]]
    arch = dinov2_arch_of(state_dict)
    if not differences or (len(differences) == 1 and file["patch size"] != model["patch size"] and not arch):
        return None  # a patch size alone: the shape listing says it (patch_embed.proj.weight)
    advice = (f"it is Meta's DINOv2 {arch}: use --arch {arch}" if arch else
              "use the --arch and --patch_size of the run that wrote it")
    return f"{'; '.join(differences)}. {advice[0].upper()}{advice[1:]}"


def load_pretrained_weights(model: nn.Module, pretrained_weights: str, checkpoint_key: Optional[str] = "teacher",
                            model_name: Optional[str] = None, patch_size: Optional[int] = None,
                            may_miss: Iterable[str] = (), loaded: Any = None) -> None:
    """Load backbone weights for evaluation, without ever downloading unless given a URL.

    Reads our `main_dino.py`/`main_distill.py` checkpoints (`checkpoint_key` teacher or student), official
    full checkpoints and backbone-only `*_pretrain.pth` files (`module.`/`backbone.` prefixes stripped,
    projection-head weights ignored), torchvision and timm state_dicts, and Meta's DINOv3 files (through
    timm's converter). Missing weights or shapes that do not match stop with one message; unexpected
    extra weights are listed (`may_miss`: names that may stay as initialised, e.g. the mask token that only
    iBOT-trained files have). No `pretrained_weights`: random weights, with a loud warning.
    """
    if not pretrained_weights:
        name = f"{model_name or type(model).__name__}" + (f" (patch size {patch_size})" if patch_size else "")
        bar = "!" * 100
        print(f"{bar}\nWARNING: no --pretrained_weights given: evaluating a RANDOMLY INITIALISED {name}.\n"
              "Nothing is downloaded. Pass the path of a checkpoint (ours, official DINO, torchvision, timm or "
              f"Meta DINOv3) to evaluate trained weights.\n{bar}")
        return
    path = local_weights_path(pretrained_weights)  # only a URL the user gave explicitly is downloaded
    # `loaded`: the file's content when the caller has already read it (export_backbone.py: no second read)
    state_dict = select_state_dict(load_checkpoint(path) if loaded is None else loaded, checkpoint_key, path)
    # official conventions: DDP `module.` and MultiCropWrapper `backbone.` prefixes
    state_dict = strip_prefix(strip_prefix(state_dict, "module."), "backbone.")
    model_state = model.state_dict()
    if type(model).__module__.startswith("timm.") and any(k not in model_state for k in state_dict):
        state_dict = _timm_convert(state_dict, model)
    structure = vit_structure_mismatch(state_dict, model_state)  # registers, LayerScale, SwiGLU, patch size
    if structure:
        raise UserError(f"{path} does not fit {model_name or type(model).__name__}: {structure}")
    # Weights of other modules saved beside the backbone (the DINO projection head, iBOT heads, the CLS
    # projection of main_distill.py, classifiers replaced by Identity, the iBOT mask token) are not part of
    # the backbone; keys under the model's own top-level names that it lacks are real mismatches.
    top_level = {k.split(".")[0] for k in model_state}
    ignored = sorted(k for k in state_dict if k not in model_state and k.split(".")[0] not in top_level)
    state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
    missing = [k for k in model_state if k not in state_dict and k not in set(may_miss)]
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
                      prefix: str = "head.", loaded: Any = None) -> bool:
    """Load the weights under `prefix` of a checkpoint (e.g. the DINO projection head of a main_dino.py
    teacher: `head.*`) into `head`. Returns False, saying why, when the checkpoint has none or they do not
    fit (other out_dim, layers or widths). `loaded`: the file's content, when already read."""
    path = local_weights_path(pretrained_weights)
    state_dict = select_state_dict(load_checkpoint(path) if loaded is None else loaded, checkpoint_key, path)
    state_dict = strip_prefix(state_dict, "module.")
    found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not found:
        print(f"{path} holds no '{prefix}*' weights")
        return False
    expected = head.state_dict()
    mismatch = sorted(set(found) ^ set(expected))
    mismatch += [k for k in found if k in expected and found[k].shape != expected[k].shape]
    if mismatch:
        print(f"the '{prefix}*' weights of {path} do not fit this head ({', '.join(mismatch[:4])}...)")
        return False
    head.load_state_dict(found, strict=True)
    print(f"Loaded the '{prefix}*' weights of {path}")
    return True


def init_from_pretrained(backbone: nn.Module, heads: Dict[str, nn.Module], pretrained_weights: str,
                         checkpoint_key: Optional[str], arch: str, patch_size: Optional[int] = None) -> None:
    """Continued pretraining: `backbone` from any weights that eval_knn.py reads (ours, official DINO,
    torchvision, timm, Meta DINOv2/DINOv3), and each head of `heads` (checkpoint prefix -> module, e.g.
    {"head.": dino_head}) from the same file when it holds fitting weights, else left fresh; a separate
    `ibot_head.` absent from the file starts from the file's DINO head (shared with iBOT in the run that wrote it,
    DINOv2's default). One line says which heads came from the file. The file is read once."""
    content = load_checkpoint(local_weights_path(pretrained_weights))
    load_pretrained_weights(backbone, pretrained_weights, checkpoint_key, arch, patch_size, may_miss=["mask_token"],
                            loaded=content)
    loaded, fresh = [], []
    for prefix, head in heads.items():
        if head is None:
            continue
        if load_head_weights(head, pretrained_weights, checkpoint_key, prefix, loaded=content):
            loaded.append(prefix.rstrip("."))
        elif prefix == "ibot_head." and "head" in loaded and load_head_weights(head, pretrained_weights,
                                                                               checkpoint_key, "head.", content):
            # the file's DINO head also projected the patch tokens (DINOv2's shared head): the best start for iBOT
            loaded.append("ibot_head (from the file's DINO head, which the run that wrote it shared with iBOT)")
        else:
            fresh.append(prefix.rstrip("."))
    line = f"Continued pretraining from {pretrained_weights}: backbone loaded"
    if loaded:
        line += f"; {', '.join(loaded)} from the file"
    if fresh:
        line += (f"; {', '.join(fresh)} fresh (none fitting in the file: a few epochs of "
                 "--freeze_backbone_epochs let fresh heads settle before they reach the backbone)")
    print(line)


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and values): identifies them in a checkpoint."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
