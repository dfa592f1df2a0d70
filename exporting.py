# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Backbones as files that run without this code: ONNX (onnxruntime, TensorRT) and torch.export programs (.pt2),
with a dynamic batch and image size, checked against PyTorch before they are written (export_backbone.py).

- `exportable(model, arch)`: the inference graph of a backbone with named outputs. Our ViTs (and Meta's DINOv2
  files): `cls_token` [B, D], `patch_tokens` [B, h*w, D], `register_tokens` [B, R, D] when the model has registers,
  and with `attention` the last block's attention [B, heads, N, N] (the explicit path, not SDPA). ConvNets
  (torchvision ResNets, timm convnets): `features` [B, C] (what `model(images)` gives) and `feature_map`
  [B, C, h, w]. No mask input.
- Position embeddings: PyTorch returns them unchanged at the native grid and interpolates them (bicubic, with
  DINO's 0.1 offset, or antialiased for DINOv2's register models) otherwise, a branch on the input size that a
  graph with a dynamic size cannot hold. The graph computes the bicubic resampling as two small matrix products
  whose weights are PyTorch's formulas (`bicubic_matrix`), identity matrices at the native grid: the same numbers
  on both paths, with no Resize operator and no data-dependent branch.
- `reference_outputs(model, arch, images)`: the same outputs from the model's own eager code, which the exported
  graph is compared with.
- `export_onnx`, `export_pt2`, `load_runner(path)`: writing and running the files; `OnnxBackbone` runs an ONNX
  file as a backbone for extract_features.py.

onnx, onnxruntime and onnxscript are imported inside the functions that need them.
"""
import importlib.util
import json
import math
import os
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn

import backbones
from utils import UserError

OPSET = 18  # the lowest with antialiased Resize; the graph has none, but TensorRT and onnxruntime both read 18
ONNX_PACKAGES = "onnx, onnxruntime and onnxscript (pip install -r requirements.txt)"
EXTERNAL_DATA_BYTES = 1.5e9  # weights past this go to NAME.onnx.data: protobuf cannot hold more than 2 GB


def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel (Keys), zero beyond |x| >= 2."""
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)))


def bicubic_matrix(out_size, in_size: int, scale: torch.Tensor, antialias: bool) -> torch.Tensor:
    """[out_size, in_size] weights W such that W @ v resamples v as F.interpolate(mode="bicubic",
    align_corners=False) does along one dimension; `scale` is PyTorch's input/output coordinate scale (in / out,
    or 1 / scale_factor when a scale factor is given). Without antialias: a = -0.75, four taps, indices clamped at
    the borders (upsample_bicubic2d); with it: a = -0.5, the kernel widened by the downsampling factor and the
    weights normalised (_upsample_bicubic2d_aa, which also leaves a dimension of unchanged size as it is)."""
    i = torch.arange(out_size, dtype=torch.float32)
    j = torch.arange(in_size, dtype=torch.float32)
    if antialias:
        support_scale = torch.clamp(scale, min=1.0)
        weights = _cubic((j[None, :] - scale * (i[:, None] + 0.5) + 0.5) / support_scale, -0.5)
        weights = weights / weights.sum(dim=1, keepdim=True)
        identity = (i[:, None] == j[None, :]).float()
        same_size = torch.ones_like(i).sum() == in_size  # a tensor, not a Python branch on a dynamic size
        return torch.where(same_size, identity, weights)
    real = scale * (i + 0.5) - 0.5
    index = torch.floor(real)
    t = real - index
    weights = torch.zeros(i.shape[0], in_size)
    for k, w in enumerate((_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))):
        source = torch.clamp(index + (k - 1), 0, in_size - 1)
        weights = weights + w[:, None] * (j[None, :] == source[:, None]).float()
    return weights


class ExportableViT(nn.Module):
    """Our VisionTransformer's inference graph with named outputs (see the module docstring)."""

    def __init__(self, vit: nn.Module, attention: bool = False):
        super().__init__()
        self.vit, self.attention = vit, attention
        self.output_names = ["cls_token", "patch_tokens"] + (["register_tokens"] if vit.num_register_tokens else []) \
            + (["attention"] if attention else [])

    def position_embedding(self, rows, cols) -> torch.Tensor:
        """[1, 1 + rows * cols, D]: the model's interpolate_pos_encoding for a rows x cols grid, as a graph."""
        vit = self.vit
        pos = vit.pos_embed
        side = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[0, 1:].reshape(side, side, -1).permute(2, 0, 1)  # [D, side, side]
        offset = vit.interpolate_offset
        # sizes as tensors: a Python branch on a dynamic size would be fixed at export time
        counts = [torch.ones(n, dtype=torch.float32).sum() for n in (rows, cols)]
        native = (counts[0] == side) & (counts[1] == side)
        matrices = []
        for n, count in zip((rows, cols), counts):
            weights = bicubic_matrix(n, side, side / (count + offset), vit.interpolate_antialias)
            identity = (torch.arange(n)[:, None] == torch.arange(side)[None, :]).float()
            matrices.append(torch.where(native, identity, weights))
        patches = matrices[0] @ grid.float() @ matrices[1].T  # [D, rows, cols]
        patches = patches.permute(1, 2, 0).reshape(1, -1, grid.shape[0]).to(pos.dtype)
        return torch.cat([pos[:, :1], patches], dim=1)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        vit = self.vit
        B = images.shape[0]
        patch = vit.patch_embed.patch_size
        rows, cols = images.shape[2] // patch, images.shape[3] // patch
        x = vit.patch_embed(images)
        x = torch.cat((vit.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.position_embedding(rows, cols)
        if vit.num_register_tokens:
            x = torch.cat((x[:, :1], vit.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        for block in vit.blocks[:-1]:
            x = block(x)
        attention = vit.blocks[-1](x, return_attention=True) if self.attention else None
        x = vit.norm(vit.blocks[-1](x))
        outputs = [x[:, 0], x[:, vit.num_prefix_tokens:]]
        if vit.num_register_tokens:
            outputs.append(x[:, 1:vit.num_prefix_tokens])
        if attention is not None:
            outputs.append(attention)
        return tuple(outputs)


class ExportableConvNet(nn.Module):
    """A convnet's inference graph: `features` (model(images), pooled) and `feature_map` (before pooling)."""

    output_names = ["features", "feature_map"]

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        self.model, self.arch = model, arch

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if type(self.model).__module__.startswith("timm."):
            feature_map = self.model.forward_features(images)
            return self.model.forward_head(feature_map, pre_logits=True), feature_map
        feature_map = backbones.patch_features(self.model, images, self.arch)[0].permute(0, 3, 1, 2)
        pooled = torch.flatten(self.model.avgpool(feature_map), 1)  # torchvision ResNets: avgpool, then fc (Identity)
        return pooled, feature_map


class Exportable(NamedTuple):
    module: nn.Module
    output_names: List[str]
    multiple: int  # image sides must be multiples of this (the patch size, or a convnet's output stride)
    native: int  # the size the model was built for (the native grid of a ViT)


def exportable(model: nn.Module, arch: str, attention: bool = False) -> Exportable:
    """The graph to export for `model` (an `--arch` built by backbones.build_backbone), or a message naming what
    can be done with it instead."""
    if backbones.is_vit(arch):
        side = int(math.sqrt(model.pos_embed.shape[1] - 1))
        patch = model.patch_embed.patch_size
        module = ExportableViT(model, attention).eval()
        return Exportable(module, module.output_names, patch, side * patch)
    if attention:
        raise UserError(f"--attention: {arch} has no attention to export; leave --attention out")
    is_timm = type(model).__module__.startswith("timm.")
    if hasattr(model, "layer4") and hasattr(model, "avgpool") and not is_timm:
        return Exportable(ExportableConvNet(model, arch).eval(), ExportableConvNet.output_names, 32, 224)
    if is_timm and not hasattr(model, "patch_embed") and hasattr(model, "forward_head"):
        return Exportable(ExportableConvNet(model, arch).eval(), ExportableConvNet.output_names, 32, 224)
    raise UserError(f"--arch {arch} cannot be exported to onnx or pt2 here (these take our ViTs, Meta's DINOv2 files, "
                    "torchvision ResNets and timm convnets, whose outputs are named); export it with --format pth, "
                    "a weights file that any of the scripts reads")


@torch.no_grad()
def reference_outputs(model: nn.Module, arch: str, images: torch.Tensor, output_names: Sequence[str]
                      ) -> Dict[str, torch.Tensor]:
    """The outputs of `exportable`, computed by the model's own eager code (F.interpolate, SDPA, ...)."""
    if backbones.is_vit(arch):
        tokens = model.forward_features(images)
        out = {"cls_token": tokens[:, 0], "patch_tokens": tokens[:, model.num_prefix_tokens:],
               "register_tokens": tokens[:, 1:model.num_prefix_tokens]}
        if "attention" in output_names:
            out["attention"] = model.get_last_selfattention(images)
        return {name: out[name] for name in output_names}
    if type(model).__module__.startswith("timm."):
        return {"features": model(images), "feature_map": model.forward_features(images)}
    return {"features": model(images),
            "feature_map": backbones.patch_features(model, images, arch)[0].permute(0, 3, 1, 2)}


# ----------------------------------------------------------------------------------------------------
# Writing and running the files
# ----------------------------------------------------------------------------------------------------
def import_onnx():
    """onnx, onnxruntime (and, for writing, onnxscript), or one message saying what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"ONNX export and ONNX files need {ONNX_PACKAGES}: {e}") from None
    return onnx, onnxruntime


def dynamic_dims(multiple: int, min_size: int, max_size: int, max_batch: int) -> Dict[int, object]:
    """torch.export dimensions of `images`: the batch, and height and width as multiples of `multiple`."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=max_batch)
    rows = Dim("rows", min=min_size // multiple, max=max_size // multiple)
    cols = Dim("cols", min=min_size // multiple, max=max_size // multiple)
    return {0: batch, 2: multiple * rows, 3: multiple * cols}


def export_pt2(exp: Exportable, example: torch.Tensor, path: str, dims: Dict[int, object], meta: Dict) -> None:
    """A torch.export ExportedProgram with the dynamic dimensions declared, to `path`, `meta` in its extra files."""
    program = torch.export.export(exp.module, (example,), dynamic_shapes={"images": dims})
    torch.export.save(program, path, extra_files={"meta.json": json.dumps(meta)})


def export_onnx(exp: Exportable, example: torch.Tensor, path: str, dims: Dict[int, object], meta: Dict,
                fp16: bool = False) -> None:
    """An ONNX file (the dynamo exporter, opset OPSET) with input `images` and the named outputs; weights past
    1.5 GB go to an external data file `path + ".data"` beside it (ONNX's protobuf limit is 2 GB)."""
    onnx, _ = import_onnx()
    if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter translates the graph with it
        raise UserError(f"ONNX export needs {ONNX_PACKAGES}: onnxscript is not installed")
    module = exp.module
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                output_names=list(exp.output_names), dynamic_shapes={"images": dims}, verbose=False)
    model = program.model_proto
    if fp16:
        model = to_fp16(model)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    external = size > EXTERNAL_DATA_BYTES
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data" if external else None)


def to_fp16(model):
    """The ONNX model with fp16 weights and activations, fp32 input and outputs (a cast at each end)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise UserError(f"--fp16 needs onnxruntime's float16 converter: {e}") from None
    return convert_float_to_float16(model, keep_io_types=True)


def check_size(images: torch.Tensor, meta: Dict, path: str) -> None:
    """The exported range: sides multiples of `multiple` between `min_size` and `max_size`, a batch up to
    `max_batch`."""
    h, w = images.shape[-2:]
    m, lo, hi = meta["multiple"], meta["min_size"], meta["max_size"]
    for side in (h, w):
        if side % m or not lo <= side <= hi:
            raise UserError(f"{path} takes images whose sides are multiples of {m} between {lo} and {hi} px; got "
                            f"{h}x{w}: resize or crop to such a size (--resize_size/--crop_size), or export again with "
                            "--min_size/--max_size")
    if images.shape[0] > meta["max_batch"]:
        raise UserError(f"{path} takes batches of at most {meta['max_batch']} images; got {images.shape[0]}")


def load_runner(path: str, threads: int = 0) -> Tuple[Callable[[torch.Tensor], Dict[str, torch.Tensor]], Dict]:
    """(images -> {output name: tensor}, meta) of an exported .onnx (onnxruntime, CPU) or .pt2 file."""
    if path.endswith(".onnx"):
        _, ort = import_onnx()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        # the metadata export_onnx wrote, as the session read it (no second read of the file)
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}

        def run_onnx(images: torch.Tensor) -> Dict[str, torch.Tensor]:
            check_size(images, meta, path)
            outputs = session.run(names, {"images": images.detach().cpu().float().numpy()})
            return {n: torch.from_numpy(o) for n, o in zip(names, outputs)}
        return run_onnx, meta
    extra = {"meta.json": ""}
    program = torch.export.load(path, extra_files=extra)
    meta = json.loads(extra["meta.json"] or "{}")
    module = program.module()

    def run_pt2(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_size(images, meta, path)
        with torch.no_grad():
            return dict(zip(meta["outputs"], module(images)))
    return run_pt2, meta


class OnnxBackbone(nn.Module):
    """An exported ONNX backbone as a frozen model for extract_features.py: `forward(images)` gives what the
    PyTorch model gives (a ViT's CLS token, a convnet's pooled features), `forward_features(images)` a ViT's
    normalised tokens [CLS, registers, patches], with `num_prefix_tokens`."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.run, self.meta = load_runner(path)
        self.vit = "cls_token" in self.meta["outputs"]
        self.num_prefix_tokens = 1 + self.meta.get("num_register_tokens", 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.run(images)
        return (outputs["cls_token"] if self.vit else outputs["features"]).to(images.device)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            raise UserError(f"{self.path} is a convnet: it has no tokens (leave --patch_tokens out)")
        o = self.run(images)
        parts = [o["cls_token"][:, None]] + ([o["register_tokens"]] if "register_tokens" in o else []) + [o["patch_tokens"]]
        return torch.cat(parts, dim=1).to(images.device)
