# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Follows the Gram teacher of dinov3/train/ssl_meta_arch.py and its refreshes in dinov3/train/train.py of
# facebookresearch/dinov3 (DINOv3 License).
"""DINOv3's Gram anchoring in main_dino.py: a frozen "Gram teacher" whose patch-to-patch similarities the student
keeps (the loss is losses/gram.py), so that continued or long training does not wash out the patch features.

- `GramTeacher`: the frozen backbone, what it started from, its refreshes, the larger crops it may see;
  `resize_patch_tokens`: its patch features on the student's grid; `gram_refresh_iterations`: DINOv3's refreshes.
- `add_args`, `check_args`, `build_gram_teacher`, `with_refresh`, `resume_check`: the flags of main_dino.py, the
  Gram teacher they ask for, its copies from the EMA teacher after the steps, and the resume check.
`ssl_meta_arch.dinov2_step` adds the loss (its `gram` argument).
"""
import argparse
import copy
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import checkpointing
import engine
import ssl_meta_arch
import utils


def resize_patch_tokens(tokens: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, h*w, D] on a `grid` (h, w) resampled to `size` (rows, cols), as DINOv3 resizes its Gram
    teacher's features to the student's grid: bicubic, align_corners=False, no antialiasing (its
    `gram.global_teacher_resize_method`/`_antialias` defaults). Unchanged when the grids are equal."""
    if tuple(grid) == tuple(size):
        return tokens
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"resize_patch_tokens: {n} tokens are not a {grid[0]}x{grid[1]} grid")
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    x = F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False)
    return x.flatten(2).transpose(1, 2).to(tokens.dtype)


def gram_refresh_iterations(every: int, first: int, max_updates: Optional[int], total_iters: int) -> List[int]:
    """The iterations after which DINOv3 copies the EMA teacher into the Gram teacher (its train.py): after
    iteration `it` when it + 1 >= `first` and (it + 1) is a multiple of `every`, at most `max_updates` times (None:
    no limit), within `total_iters`. `every` 0: never."""
    if every <= 0:
        return []
    its = [it for it in range(every - 1, total_iters, every) if it + 1 >= first]
    return its if max_updates is None else its[:max_updates]


class GramTeacher(nn.Module):
    """DINOv3's Gram teacher: a frozen copy of a backbone whose patch-to-patch similarities the student keeps.

    - `backbone`: the student's architecture, its weights from the starting weights, a file or the EMA teacher;
      never trained (no gradients, always in eval mode: no drop-path), changed only by `maybe_refresh`;
    - `refresh_after`: iterations after which `maybe_refresh(it, teacher_backbone)` copies the EMA teacher's
      backbone into it (`gram_refresh_iterations`); `refreshes` counts the copies (a buffer: in the checkpoint);
    - `crops_size`: the side of the larger copies of the global crops that it sees (None: the global crops
      themselves); its patch tokens are resized to the student's grid (`resize_patch_tokens`);
    - `source`: what it started from, in words (printed, and saved in checkpoints).
    Its state_dict (`backbone.*`, `refreshes`) goes into checkpoints, so that a resumed run has the same one."""

    def __init__(self, backbone: nn.Module, source: str, refresh_after: Sequence[int] = (),
                 crops_size: Optional[int] = None):
        super().__init__()
        self.backbone, self.source, self.crops_size = backbone, source, crops_size
        self.refresh_after = frozenset(int(it) for it in refresh_after)
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long))
        self.backbone.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "GramTeacher":
        return super().train(False)  # always evaluation mode: a fixed target

    @torch.no_grad()
    def patch_targets(self, images: torch.Tensor, student_grid: Tuple[int, int]) -> torch.Tensor:
        """Its patch tokens of `images` [B, 3, H, W], on the student's patch grid: [B, rows * cols, D]."""
        _, patches, grid = ssl_meta_arch.tokens_and_grid(self.backbone, images)
        return resize_patch_tokens(patches, grid, student_grid)

    @torch.no_grad()
    def maybe_refresh(self, it: int, teacher_backbone: nn.Module) -> bool:
        """After iteration `it`: copy `teacher_backbone`'s weights when `it` is one of `refresh_after`."""
        if it not in self.refresh_after:
            return False
        self.backbone.load_state_dict(teacher_backbone.state_dict())  # copies into its tensors, strictly
        self.refreshes += 1
        return True


def larger_crops_size(args: argparse.Namespace) -> Optional[int]:
    """The side of the Gram teacher's own crops (--gram_teacher_crops_size), or None when it sees the global crops
    themselves (flag absent, or equal to --global_crops_size)."""
    size = getattr(args, "gram_teacher_crops_size", None)  # main_distill.py has no such flag
    return size if size != args.global_crops_size else None


def add_args(parser: argparse.ArgumentParser) -> None:
    """The flags of DINOv3's Gram anchoring (off by default): the Gram loss, which Gram teacher, its refreshes and
    the size of the crops it sees."""
    group = parser.add_argument_group("Gram anchoring (DINOv3; with DINOv2's objective)")
    group.add_argument('--gram_loss_weight', default=0.0, type=float, help="""Weight of DINOv3's Gram loss: the
        student's patch-to-patch cosine similarities against the Gram teacher's (DINOv3: 1 to 2; 0: off).""")
    group.add_argument('--gram_teacher', default='start', type=str, help="""The Gram teacher: 'start' (the
        starting weights of --pretrained_weights, frozen: do not forget them), 'ema' (the EMA teacher, copied in
        every --gram_update_freq iterations, as DINOv3), or a weights file that --pretrained_weights could read, of
        the student's --arch (read with --checkpoint_key).""")
    group.add_argument('--gram_update_freq', default=0, type=int, help="""Copy the EMA teacher into the Gram
        teacher after every x iterations (DINOv3: 10000; 0: never). Needed by --gram_teacher ema.""")
    group.add_argument('--gram_first_update', default=0, type=int,
                       help="No copy before this iteration (DINOv3's gram.it_first_update).")
    group.add_argument('--gram_max_updates', default=None, type=int,
                       help="At most this many copies (DINOv3's gram.max_updates; default: no limit).")
    group.add_argument('--gram_teacher_crops_size', default=None, type=int, help="""The Gram teacher sees the
        global crops at this larger size, its patch features resized (bicubic) to the student's grid (DINOv3: 2x
        --global_crops_size; default: the global crops themselves).""")
    group.add_argument('--gram_img_level', default=True, type=utils.bool_flag, help="""One Gram matrix per
        image (true, DINOv3's anchoring config) or one over all patches of the batch (false).""")


GRAM_DEFAULTS = {"gram_teacher": "start", "gram_update_freq": 0, "gram_first_update": 0, "gram_max_updates": None,
                 "gram_teacher_crops_size": None, "gram_img_level": True}


def check_args(args: argparse.Namespace, dinov2_objective: bool) -> None:
    """The Gram anchoring flags: values and combinations (what the backbone must have is checked when it is
    built: `build_gram_teacher`). `dinov2_objective`: whether the run trains DINOv2's objective."""
    if not hasattr(args, "gram_teacher"):
        return  # main_distill.py
    if args.gram_loss_weight < 0:
        raise utils.UserError(f"--gram_loss_weight must not be negative, got {args.gram_loss_weight}")
    if args.gram_loss_weight == 0:
        for name, default in GRAM_DEFAULTS.items():
            if getattr(args, name) != default:
                raise utils.UserError(f"--{name} sets Gram anchoring, which is off: add --gram_loss_weight 1 (or "
                                      "leave the flag at its default)")
        return
    if not dinov2_objective:
        raise utils.UserError("--gram_loss_weight: Gram anchoring is part of the DINOv2/DINOv3 objective here; add "
                              "--ibot_loss_weight 1 --koleo_loss_weight 0.1 (or at least one of them)")
    for name in ("gram_update_freq", "gram_first_update"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.gram_max_updates is not None and args.gram_max_updates < 1:
        raise utils.UserError(f"--gram_max_updates must be at least 1 (default: no limit), got {args.gram_max_updates}")
    if args.gram_teacher == "start":
        if not args.pretrained_weights:
            raise utils.UserError("--gram_teacher start anchors to the starting weights, which are random without "
                                  "--pretrained_weights: give the weights to continue from, or --gram_teacher FILE")
        if args.gram_update_freq:
            raise utils.UserError("--gram_teacher start is frozen; a Gram teacher refreshed from the EMA teacher "
                                  f"every {args.gram_update_freq} iterations is --gram_teacher ema")
    elif args.gram_teacher == "ema":
        if not args.gram_update_freq:
            raise utils.UserError("--gram_teacher ema copies the EMA teacher every --gram_update_freq iterations: give "
                                  "it (DINOv3: 10000), or use --gram_teacher start to keep the starting weights")
    elif not os.path.isfile(args.gram_teacher) and not engine.has_checkpoint(args.output_dir):
        raise utils.UserError(f"--gram_teacher {args.gram_teacher}: no such file (use 'start', 'ema' or the path of "
                              "a weights file)")
    size = args.gram_teacher_crops_size
    if size is not None:
        patch = backbones.patch_size_of(args.arch, args.patch_size) if backbones.is_vit(args.arch) else 1
        if size < args.global_crops_size or size % patch:
            raise utils.UserError(f"--gram_teacher_crops_size {size} must be at least --global_crops_size "
                                  f"({args.global_crops_size}) and a multiple of the patch size ({patch})")


def build_gram_teacher(args: argparse.Namespace, student_backbone: nn.Module,
                       niter_per_ep: int) -> GramTeacher:
    """DINOv3's Gram teacher of --gram_teacher: a copy of the student's backbone (its architecture), holding the
    starting weights, the weights of a file, or (for 'ema') the EMA teacher's, which are the starting ones until
    the first copy. On resume the checkpoint's Gram teacher replaces them (`fit`)."""
    if not backbones.has_patch_tokens(student_backbone):
        raise utils.UserError(f"--gram_loss_weight: Gram anchoring compares patch tokens, and --arch {args.arch} has "
                              "none (a convnet gives a feature map, not tokens). Use a ViT (ours, Meta's DINOv2 or "
                              "DINOv3, timm's) or leave --gram_loss_weight at 0")
    backbone = copy.deepcopy(student_backbone)  # before compile and DDP: the plain module
    refresh = gram_refresh_iterations(args.gram_update_freq, args.gram_first_update, args.gram_max_updates,
                                      args.epochs * niter_per_ep)
    source = {"start": f"the starting weights ({args.pretrained_weights}), frozen",
              "ema": "the EMA teacher (the starting weights until its first copy)"}.get(args.gram_teacher)
    if source is None:
        source = f"{args.gram_teacher} ({args.checkpoint_key or 'its weights'})"
        if not engine.has_checkpoint(args.output_dir):
            try:
                checkpointing.load_pretrained_weights(backbone, args.gram_teacher, args.checkpoint_key, args.arch,
                                                      args.patch_size, may_miss=["mask_token"])
            except utils.UserError as e:
                raise utils.UserError(f"--gram_teacher: the Gram teacher is a {args.arch} like the student, and {e}")
    gram = GramTeacher(backbone, source, refresh, larger_crops_size(args))
    sees = (f"the global crops at {gram.crops_size} px, its patch features resized to the student's grid"
            if gram.crops_size else "the global crops")
    copies = (f"; the EMA teacher copied into it after {len(refresh)} iteration(s): {describe_iterations(refresh)}"
              if refresh else "; never updated")
    print(f"Gram anchoring (DINOv3): Gram loss x {args.gram_loss_weight:g} on the student's patch tokens of the "
          f"global crops. Gram teacher: {source}; it sees {sees}{copies}.")
    return gram


def describe_iterations(its: Sequence[int]) -> str:
    """A list of iterations in a few words: all of them when short, else the first ones and the last."""
    if len(its) <= 6:
        return ", ".join(map(str, its))
    return f"{its[0]}, {its[1]}, {its[2]}, ..., {its[-1]} (every {its[1] - its[0]})"


def resume_check(args: argparse.Namespace, gram: Optional[GramTeacher]):
    """`fit`'s check of the checkpoint it resumes: with Gram anchoring, the checkpoint must hold the Gram teacher
    of the same --gram_teacher (its weights are the run's state: they cannot be rebuilt)."""
    def check(checkpoint: dict) -> None:
        if gram is None:
            return
        path = os.path.join(args.output_dir, "checkpoint.pth")
        if "gram_teacher" not in checkpoint:
            raise utils.UserError(f"{path} was written without Gram anchoring: it holds no Gram teacher to resume. "
                                  "Resume it without --gram_loss_weight, or continue from it in a new --output_dir "
                                  f"with --pretrained_weights {path}")
        saved = checkpoint.get("args") or {}
        saved = saved if isinstance(saved, dict) else vars(saved)
        if saved.get("gram_teacher", args.gram_teacher) != args.gram_teacher:
            raise utils.UserError(f"{path} was written with --gram_teacher {saved['gram_teacher']}, this run asks for "
                                  f"--gram_teacher {args.gram_teacher}: resume with the same flag, or use another "
                                  "--output_dir")
    return check


def with_refresh(after_step, gram: GramTeacher, teacher_backbone: nn.Module):
    """`after_step` followed by DINOv3's refresh of the Gram teacher from the EMA teacher just updated."""
    def after_step_and_refresh(it: int):
        figures = after_step(it)
        if gram.maybe_refresh(it, teacher_backbone):
            print(f"Gram teacher: the EMA teacher copied in after iteration {it} (copy {int(gram.refreshes)} of "
                  f"{len(gram.refresh_after)})")
        return figures

    return after_step_and_refresh
