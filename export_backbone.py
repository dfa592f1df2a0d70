# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Export a backbone: a weights file (pth, default), an ONNX file or a torch.export program (pt2).

    python export_backbone.py runs/imagenette/checkpoint.pth runs/imagenette/backbone.pth
    python export_backbone.py runs/distill/checkpoint.pth student.pth --checkpoint_key student
    python export_backbone.py runs/imagenette/checkpoint.pth backbone.onnx          # format from the extension
    python export_backbone.py dinov2_vits14_reg4_pretrain.pth vits14reg.pt2 --attention true

The weights are read as `--pretrained_weights` reads them everywhere else (checkpointing.load_pretrained_weights):
our checkpoints, official DINO files, Meta's DINOv2 and DINOv3 files, timm and torchvision state_dicts. The
architecture is the checkpoint's saved `--arch` (or Meta's DINOv2 one, recognised from the weights), or
`--arch`/`--patch_size`.

- `pth`: the plain `state_dict` of the backbone, like the official `dino_deitsmall16_pretrain.pth` files (no heads,
  no optimizer, no `backbone.` prefix), for `--pretrained_weights` and torch.hub.
- `onnx`, `pt2`: the inference graph (exporting.py) taking a normalised image batch `images` [B, 3, H, W], with B
  and H, W dynamic (H, W multiples of the patch size, or 32 for convnets, between --min_size and --max_size), and
  named outputs: `cls_token`, `patch_tokens`, `register_tokens` (models with registers) and, with --attention,
  `attention` for ViTs; `features`, `feature_map` for convnets. ONNX: the dynamo exporter (onnxscript), opset 18;
  pt2: torch.export with the dimensions declared as multiples of the patch size.

Nothing is written before it has been checked: the file is run (onnxruntime on the CPU, or the loaded program)
on images at the native size, at a smaller size and at a non-square size, in batches of 1 and 2, its outputs are
compared with the PyTorch model's own code, the largest differences are printed, and above --tolerance (relative
to the outputs' largest magnitude) the export stops with a message. Then the file is renamed into place.
"""
import argparse
import os
import secrets
import shutil
import time
from typing import Dict, List, Tuple

import torch

import augmentations
import backbones
import checkpointing
import runtime
import utils

FORMATS = ("pth", "onnx", "pt2")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="A checkpoint of main_dino.py or main_distill.py, or any weights file that "
                        "--pretrained_weights reads (Meta's DINOv2/DINOv3 files, official DINO, timm, torchvision).")
    parser.add_argument("output", help="Where to write the backbone (.pth, .onnx or .pt2).")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="pth (weights), onnx or pt2 (graphs). Default: from the output's extension, else pth.")
    # --arch and --patch_size (default: the checkpoint's), --checkpoint_key (teacher of main_dino.py, student of
    # main_distill.py); the weights are the positional `checkpoint`
    backbones.add_model_args(parser, arch=None, patch_size=None, weights=False, images=False)
    parser.add_argument("--attention", default=False, type=utils.bool_flag,
                        help="onnx/pt2, ViTs: also output the last block's attention [B, heads, N, N].")
    parser.add_argument("--min_size", default=None, type=int,
                        help="onnx/pt2: the smallest image side accepted (default and least: two patches).")
    parser.add_argument("--max_size", default=None, type=int,
                        help="onnx/pt2: the largest image side accepted (default: 4x the native size).")
    parser.add_argument("--max_batch", default=1024, type=int, help="onnx/pt2: the largest batch accepted.")
    parser.add_argument("--fp16", default=False, type=utils.bool_flag, help="""onnx: fp16 weights and
        activations (fp32 input and outputs). Checked where onnxruntime's CPU runs it, said where it does not.""")
    parser.add_argument("--tolerance", default=None, type=float, help="""Largest difference from PyTorch accepted,
        relative to the largest magnitude of each output (default 1e-4, fp16 1e-2).""")
    return parser


def output_format(args: argparse.Namespace) -> str:
    ext = os.path.splitext(args.output)[1].lower().lstrip(".")
    fmt = args.format or (ext if ext in FORMATS else "pth")
    if ext in FORMATS and ext != fmt:
        raise utils.UserError(f"--format {fmt} but the output {args.output} ends in .{ext}: make them agree")
    if fmt != "onnx" and args.fp16:
        raise utils.UserError("--fp16 is for --format onnx (the pt2 program and the weights stay fp32)")
    if fmt == "pth" and (args.attention or args.min_size or args.max_size):
        raise utils.UserError("--attention, --min_size and --max_size are for the graph formats (onnx, pt2); a pth "
                              "file holds weights only")
    return fmt


def build_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, str, int]:
    """(backbone with the checkpoint's weights, arch, patch size), through the one weights loader."""
    checkpoint = checkpointing.load_checkpoint(args.checkpoint)
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    # no weights under --checkpoint_key: its own message, naming the keys the file has
    state_dict = checkpointing.select_state_dict(checkpoint, args.checkpoint_key, args.checkpoint)
    arch = args.arch or saved.get("arch")
    if not arch:
        arch = checkpointing.dinov2_arch_of(checkpointing.strip_prefix(state_dict, "module."))
        if not arch:
            raise utils.UserError(f"{args.checkpoint} does not record its architecture: give --arch (and "
                                  "--patch_size for our ViTs)")
        print(f"{args.checkpoint} is Meta's DINOv2 {arch} (from its weights): exporting it as --arch {arch}")
    patch_size = backbones.patch_size_of(arch, args.patch_size or saved.get("patch_size") or 16)
    model, _ = backbones.build_backbone(arch, patch_size)
    try:  # the file read once: the loader takes its content
        checkpointing.load_pretrained_weights(model, args.checkpoint, args.checkpoint_key, arch, patch_size,
                                              loaded=checkpoint)
    except utils.UserError as e:
        raise utils.UserError(f"the '{args.checkpoint_key}' weights of {args.checkpoint} are not a {arch} (patch size "
                              f"{patch_size}) backbone: {e}. Check --checkpoint_key, --arch and --patch_size") from None
    return model.eval(), arch, patch_size


def write_weights(model: torch.nn.Module, path: str) -> Dict[str, torch.Tensor]:
    # clones: a view would drag its whole storage into the file
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    checkpointing.atomic_save(state_dict, path)
    return state_dict


def check_inputs(native: int, multiple: int, min_size: int) -> List[torch.Tensor]:
    """Normalised-looking images at the native size, a smaller size and a non-square size, batches of 1 and 2."""
    smaller = max(min_size, native - 2 * multiple)
    narrower = max(min_size, native - 3 * multiple)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, h, w, generator=generator)
            for batch in (1, 2) for h, w in ((native, native), (smaller, smaller), (native, narrower))]


def compare(model: torch.nn.Module, arch: str, run, names: List[str], inputs: List[torch.Tensor], tolerance: float,
            label: str) -> float:
    """The largest relative difference between the exported file and PyTorch over `inputs`, printed per input;
    an output above `tolerance` stops the export."""
    import exporting
    worst = 0.
    for images in inputs:
        reference = exporting.reference_outputs(model, arch, images, names)
        got = run(images)
        parts = []
        for name in names:
            scale = max(1., reference[name].abs().max().item())
            if got[name].shape != reference[name].shape:
                raise utils.UserError(f"the exported {label} gives {name} of shape {tuple(got[name].shape)} for "
                                      f"{tuple(images.shape)}, PyTorch {tuple(reference[name].shape)}: not written")
            diff = (got[name].float() - reference[name]).abs().max().item()
            worst = max(worst, diff / scale)
            parts.append(f"{name} {diff:.2e}" + (f" (of {scale:.3g})" if scale > 1 else ""))
            if not diff <= tolerance * scale:
                raise utils.UserError(f"the exported {label} differs from PyTorch on {tuple(images.shape)} images: "
                                      f"{name} by {diff:.3g} (outputs up to {scale:.3g}; tolerance {tolerance:g} of "
                                      "that): not written. This is a bug of the export; please report it with the "
                                      "command")
        print(f"  {tuple(images.shape)}: max |difference| " + ", ".join(parts))
    return worst


def export_graph(args: argparse.Namespace, model: torch.nn.Module, arch: str, fmt: str) -> Dict:
    """Export, check, then rename into place (the ONNX external data file first, when there is one)."""
    import exporting
    exp = exporting.exportable(model, arch, args.attention)
    m = exp.multiple
    min_size = args.min_size or 2 * m
    max_size = args.max_size or 4 * exp.native
    unit = "patch size" if backbones.is_vit(arch) else "output stride"
    for flag, size in (("--min_size", min_size), ("--max_size", max_size)):
        if size % m or size < 2 * m:
            # torch.export specialises a dimension that can be 1: a grid of one patch would be another program
            raise utils.UserError(f"{flag} {size} is not a multiple of {m}, the {unit} of {arch}, of at least {2 * m}")
    if not min_size <= exp.native <= max_size:
        raise utils.UserError(f"--min_size {min_size} and --max_size {max_size} must hold the native size {exp.native}")
    if fmt == "onnx":
        exporting.import_onnx()  # a missing package says so before the export's minutes
    tolerance = args.tolerance or (1e-2 if args.fp16 else 1e-4)
    meta = {"arch": arch, "format": fmt, "outputs": exp.output_names, "multiple": m, "native_size": exp.native,
            "min_size": min_size, "max_size": max_size, "max_batch": args.max_batch,
            "num_register_tokens": getattr(model, "num_register_tokens", 0), "fp16": args.fp16,
            "opset": exporting.OPSET if fmt == "onnx" else None, "checkpoint": os.path.abspath(args.checkpoint),
            "checkpoint_key": args.checkpoint_key, "input": "images [B, 3, H, W], RGB in [0, 1] normalised with "
            f"mean {list(augmentations.IMAGENET_DEFAULT_MEAN)} and std {list(augmentations.IMAGENET_DEFAULT_STD)}"}
    dims = exporting.dynamic_dims(m, min_size, max_size, args.max_batch)
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    work = os.path.join(folder, f".{os.path.basename(args.output)}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    os.makedirs(work)
    try:
        staged = os.path.join(work, os.path.basename(args.output))
        start = time.time()
        example = torch.randn(2, 3, exp.native, exp.native)
        if fmt == "onnx":
            exporting.export_onnx(exp, example, staged, dims, meta, fp16=args.fp16)
            how = f"torch.onnx.export (dynamo exporter, onnxscript), opset {exporting.OPSET}"
        else:
            exporting.export_pt2(exp, example, staged, dims, meta)
            how = "torch.export"
        print(f"Exported with {how} in {time.time() - start:.0f} s; checking it against PyTorch "
              f"(tolerance {tolerance:g} of each output's largest magnitude):")
        inputs = check_inputs(exp.native, m, min_size)
        try:
            run, _ = exporting.load_runner(staged)
            worst = compare(model, arch, run, exp.output_names, inputs, tolerance, f"{fmt} file")
        except Exception as e:
            if not (args.fp16 and "NOT_IMPLEMENTED" in str(e)):
                raise
            worst = None
            print(f"WARNING: the fp16 file was not checked: onnxruntime's CPU cannot run it ({str(e).splitlines()[0][:200]})."
                  " Check it on the runtime that will run it (a GPU provider, TensorRT).")
        for name in sorted(os.listdir(work), key=lambda n: n.endswith(".onnx") or n.endswith(".pt2")):
            os.replace(os.path.join(work, name), os.path.join(folder, name))  # data first, then the model file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"meta": meta, "worst": worst}


def export_backbone(args: argparse.Namespace) -> Dict:
    if os.path.abspath(args.checkpoint) == os.path.abspath(args.output):
        raise utils.UserError(f"the output {args.output} is the checkpoint itself: give another path")
    fmt = output_format(args)
    model, arch, patch_size = build_model(args)
    name = f"{arch}" + (f"/{patch_size}" if backbones.is_vit(arch) else "")
    n_params = sum(p.numel() for p in model.parameters())
    if fmt == "pth":
        state_dict = write_weights(model, args.output)
        print(f"Wrote {args.output}: the {name} backbone ({len(state_dict)} tensors, {n_params / 1e6:.1f}M values) of "
              f"the '{args.checkpoint_key}' network of {args.checkpoint}.")
        patch_flag = "" if arch in backbones.DINOV2_ARCHS or not backbones.is_vit(arch) else f" --patch_size {patch_size}"
        print(f"Use it with: eval_knn.py --arch {arch}{patch_flag} --pretrained_weights {args.output}")
        return {"format": fmt}
    result = export_graph(args, model, arch, fmt)
    meta = result["meta"]
    print(f"Wrote {args.output}: the {name} backbone of {args.checkpoint} ({n_params / 1e6:.1f}M parameters"
          f"{', fp16' if args.fp16 else ''}), input images [B, 3, H, W] with B <= {meta['max_batch']} and H, W "
          f"multiples of {meta['multiple']} in {meta['min_size']}..{meta['max_size']}; outputs "
          f"{', '.join(meta['outputs'])}.")
    if fmt == "onnx":
        print(f"Use it with: extract_features.py --pretrained_weights {args.output} ... (onnxruntime), or TensorRT "
              "(docs/export.md)")
    else:
        print(f"Use it with: torch.export.load('{args.output}').module()(images)")
    return {"format": fmt, **result}


if __name__ == "__main__":
    runtime.run_script(export_backbone, get_args_parser().parse_args())
