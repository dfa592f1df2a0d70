# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Turn a training checkpoint into a backbone-only weights file: the plain `state_dict` of the backbone, like
the official `dino_deitsmall16_pretrain.pth` files (no heads, no optimizer, no `backbone.` prefix).

    python export_backbone.py runs/imagenette/checkpoint.pth runs/imagenette/backbone.pth
    python export_backbone.py runs/distill/checkpoint.pth student.pth --checkpoint_key student

The file loads into `eval_knn.py`/`eval_linear.py`/`extract_features.py --pretrained_weights`, into
`main_dino.py --pretrained_weights` (continued pretraining) and into torch.hub
(`torch.hub.load(REPO, 'dino_vits16', source='local', weights='backbone.pth')`). The architecture is read
from the checkpoint's saved flags (or given with --arch/--patch_size), and the exported weights are loaded
into a freshly built backbone, strictly, before the file is written.
"""
import argparse
import os

import backbones
import checkpointing
import runtime
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="A checkpoint of main_dino.py or main_distill.py, or a backbone file "
                        "such as Meta's DINOv2 files (any file that eval_knn.py reads).")
    parser.add_argument("output", help="Where to write the backbone-only weights (.pth).")
    # --arch and --patch_size (default: the checkpoint's), --checkpoint_key (teacher of main_dino.py, student of
    # main_distill.py); the weights are the positional `checkpoint`
    backbones.add_model_args(parser, arch=None, patch_size=None, weights=False, images=False)
    return parser


def backbone_state_dict(checkpoint: dict, checkpoint_key: str, path: str) -> dict:
    """The backbone's weights in `checkpoint[checkpoint_key]` (or in the file, when it is a state_dict), with
    the DDP `module.` and MultiCropWrapper `backbone.` prefixes removed and the heads left out. The iBOT mask
    token of a distilled student is a training-only input and is left out too (official files have none)."""
    state_dict = checkpointing.strip_prefix(checkpointing.select_state_dict(checkpoint, checkpoint_key, path),
                                            "module.")
    if any(k.startswith("backbone.") for k in state_dict):  # a wrapper with heads: keep the backbone only
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    # clones: a view would drag its whole storage (e.g. a checkpoint's flat buffers) into the file
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items() if k != "mask_token"}


def export_backbone(args: argparse.Namespace) -> None:
    if os.path.abspath(args.checkpoint) == os.path.abspath(args.output):
        raise utils.UserError(f"the output {args.output} is the checkpoint itself: give another path")
    checkpoint = checkpointing.load_checkpoint(args.checkpoint)
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    state_dict = backbone_state_dict(checkpoint, args.checkpoint_key, args.checkpoint)
    arch = args.arch or saved.get("arch") or checkpointing.dinov2_arch_of(state_dict)
    if not arch:
        raise utils.UserError(f"{args.checkpoint} does not record its architecture: give --arch (and "
                              "--patch_size for our ViTs)")
    if not (args.arch or saved.get("arch")):
        print(f"{args.checkpoint} is Meta's DINOv2 {arch} (from its weights): exporting it as --arch {arch}")
    patch_size = backbones.patch_size_of(arch, args.patch_size or saved.get("patch_size") or 16)
    model, dim = backbones.build_backbone(arch, patch_size)
    structure = checkpointing.vit_structure_mismatch(state_dict, model.state_dict())
    if structure:
        raise utils.UserError(f"the '{args.checkpoint_key}' weights of {args.checkpoint} are not a {arch} backbone: "
                              f"{structure}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise utils.UserError(f"the '{args.checkpoint_key}' weights of {args.checkpoint} are not a {arch} "
                              f"(patch size {patch_size}) backbone: {' '.join(first[:3])[:400]}. Check "
                              "--checkpoint_key, --arch and --patch_size") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    checkpointing.atomic_save(state_dict, args.output)
    n_params = sum(v.numel() for v in state_dict.values())
    print(f"Wrote {args.output}: the {arch}" + (f"/{patch_size}" if backbones.is_vit(arch) else "") +
          f" backbone ({len(state_dict)} tensors, {n_params / 1e6:.1f}M values, {dim}-d features) of the "
          f"'{args.checkpoint_key}' network of {args.checkpoint}.")
    patch_flag = "" if arch in backbones.DINOV2_ARCHS or not backbones.is_vit(arch) else f" --patch_size {patch_size}"
    print(f"Use it with: eval_knn.py --arch {arch}{patch_flag} --pretrained_weights {args.output}")


if __name__ == "__main__":
    runtime.run_script(export_backbone, get_args_parser().parse_args())
