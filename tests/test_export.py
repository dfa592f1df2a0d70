"""export_backbone.py --format onnx|pt2 (exporting.py): graphs with a dynamic batch and image size that give
PyTorch's numbers on both position-embedding paths (native grid and interpolated), checked before they are
written; a perturbed graph is refused with nothing written; extract_features.py runs an ONNX file; the bad inputs
end in one message. ViT-S/16 in the default suite; ViT-S/14 with registers, ResNet-50 and a timm convnet are
marked slow (each export takes 10-30 s on 2 cores)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones
import export_backbone
import exporting
import extract_features
import utils
from conftest import REPO_ROOT, assert_one_error_line, parse, perturbed_state, run_cmd

pytest.importorskip("onnxruntime", reason="onnx export tests need onnx, onnxruntime and onnxscript "
                                          "(requirements.txt)")


def export(*argv):
    return export_backbone.export_backbone(export_backbone.get_args_parser().parse_args([str(a) for a in argv]))


def backbone_file(tmp_path, arch, patch_size=16, seed=0):
    """A backbone-only weights file of `arch` with non-trivial values everywhere (position embeddings ~ N(0, 1),
    so that interpolating them matters)."""
    model, _ = backbones.build_backbone(arch, patch_size)
    model.load_state_dict(perturbed_state(model, seed))
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def assert_same_as_pytorch(path, model, arch, sizes, tolerance=1e-4):
    run, meta = exporting.load_runner(str(path))
    for batch, h, w in sizes:
        images = torch.randn(batch, 3, h, w)
        got = run(images)
        reference = exporting.reference_outputs(model, arch, images, meta["outputs"])
        assert list(got) == meta["outputs"]
        for name in meta["outputs"]:
            scale = max(1., reference[name].abs().max().item())
            assert got[name].shape == reference[name].shape, name
            assert (got[name] - reference[name]).abs().max().item() <= tolerance * scale, (name, batch, h, w)
    return run, meta


@pytest.mark.parametrize("antialias,offset", [(False, 0.1), (True, 0.0), (False, 0.0), (True, 0.1)])
def test_bicubic_matrix_is_torch_bicubic(antialias, offset):
    torch.manual_seed(0)
    side = 14
    grid = torch.randn(1, 5, side, side)
    for rows, cols in [(10, 10), (10, 7), (20, 16), (5, 21), (37, 37), (3, 3), (14, 9)]:
        sizes = ({"scale_factor": ((rows + offset) / side, (cols + offset) / side)} if offset
                 else {"size": (rows, cols)})
        reference = F.interpolate(grid, mode="bicubic", antialias=antialias, **sizes)[0]
        matrices = [exporting.bicubic_matrix(n, side, torch.tensor(side / (n + offset)), antialias)
                    for n in (rows, cols)]
        got = matrices[0] @ grid[0] @ matrices[1].T
        assert (got - reference).abs().max() < 2e-5, (rows, cols)


@pytest.fixture(scope="module")
def vits16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vits16")
    path, model = backbone_file(tmp, "vit_small")
    onnx_path, pt2_path = tmp / "vits16.onnx", tmp / "vits16.pt2"
    export(path, onnx_path, "--arch", "vit_small", "--patch_size", 16, "--attention", "true")
    export(path, pt2_path, "--arch", "vit_small", "--patch_size", 16, "--max_size", 512)
    return path, model, onnx_path, pt2_path


# batch, height, width: the native grid, interpolated square, non-square both ways, and other batches
VIT16_SIZES = [(1, 224, 224), (3, 224, 224), (2, 160, 160), (1, 240, 96), (2, 96, 320), (1, 32, 32)]


def test_vit_onnx_equals_pytorch_at_any_size(vits16, capsys):
    _, model, onnx_path, _ = vits16
    run, meta = assert_same_as_pytorch(onnx_path, model, "vit_small", VIT16_SIZES)
    assert meta["outputs"] == ["cls_token", "patch_tokens", "attention"] and meta["opset"] == 18
    assert meta["min_size"] == 32 and meta["max_size"] == 896 and meta["multiple"] == 16
    import onnx
    graph = onnx.load(str(onnx_path)).graph
    assert [i.name for i in graph.input] == ["images"], "the inference graph: no mask input"
    assert {n.op_type for n in graph.node}.isdisjoint({"Resize", "If", "Loop"}), "one graph for every size"
    shape = graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(shape) if i != 1) and shape[1].dim_value == 3
    assert not (onnx_path.parent / (onnx_path.name + ".data")).exists(), "small models keep their weights inside"


def test_vit_pt2_equals_pytorch_and_declares_its_dimensions(vits16):
    _, model, _, pt2_path = vits16
    run, meta = assert_same_as_pytorch(pt2_path, model, "vit_small", VIT16_SIZES)
    assert meta["outputs"] == ["cls_token", "patch_tokens"] and meta["max_size"] == 512
    program = torch.export.load(str(pt2_path))
    constraints = {str(k): (v.lower, v.upper) for k, v in program.range_constraints.items()}
    assert (2, 32) in constraints.values() and (1, 1024) in constraints.values(), constraints  # rows, cols; batch
    with pytest.raises(utils.UserError, match=r"multiples of 16 between 32 and 512 px; got 224x200"):
        run(torch.randn(1, 3, 224, 200))
    with pytest.raises(utils.UserError, match=r"got 528x224"):
        run(torch.randn(1, 3, 528, 224))


def test_a_perturbed_graph_is_refused_and_nothing_is_written(vits16, tmp_path, monkeypatch):
    path, _, _, _ = vits16
    original = exporting.bicubic_matrix
    monkeypatch.setattr(exporting, "bicubic_matrix", lambda *a, **k: original(*a, **k) * 1.001)
    out = tmp_path / "out" / "bad.pt2"
    with pytest.raises(utils.UserError, match=r"the exported pt2 file differs from PyTorch on \(1, 3, 192, 192\) "
                                              r"images: cls_token by .* not written"):
        export(path, out, "--arch", "vit_small", "--patch_size", 16)
    assert os.listdir(out.parent) == [], "neither the file nor a temporary is left"


def test_extract_features_runs_the_onnx_file(vits16, tiny_folder, tmp_path):
    path, _, onnx_path, _ = vits16
    common = ["--data_path", tiny_folder, "--resize_size", 32, "--crop_size", 32, "--num_workers", 0,
              "--patch_tokens", "true"]
    extract_features.extract_features(parse(extract_features, "--arch", "vit_small", "--patch_size", 16,
                                            "--pretrained_weights", path, "--output_dir", tmp_path / "pt", *common))
    # --arch is the file's, whatever the flag says
    extract_features.extract_features(parse(extract_features, "--pretrained_weights", onnx_path, "--arch", "vit_tiny",
                                            "--output_dir", tmp_path / "onnx", *common))
    for name in ("features.npy", "patch_features.npy"):
        a, b = np.load(tmp_path / "pt" / name), np.load(tmp_path / "onnx" / name)
        assert a.shape == b.shape == (11, 384) and np.abs(a - b).max() < 1e-4, name
    meta = json.loads((tmp_path / "onnx" / "meta.json").read_text())
    options = meta["options"]
    assert options["arch"] == "vit_small" and options["patch_size"] == 16 and options["pretrained_weights"] == str(onnx_path)


def test_pth_export_still_writes_the_weights_through_the_one_loader(vits16, tmp_path):
    path, model, _, _ = vits16
    export(path, tmp_path / "b.pth", "--arch", "vit_small", "--patch_size", 16)
    exported = torch.load(tmp_path / "b.pth", weights_only=True)
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())


def test_bad_exports_end_in_one_line(vits16, tmp_path):
    path, _, _, _ = vits16
    with pytest.raises(utils.UserError, match="--min_size 20 is not a multiple of 16, the patch size of vit_small, of at least 32"):
        export(path, tmp_path / "a.onnx", "--arch", "vit_small", "--min_size", 20)
    with pytest.raises(utils.UserError, match="--format onnx but the output .*a.pt2 ends in .pt2"):
        export(path, tmp_path / "a.pt2", "--arch", "vit_small", "--format", "onnx")
    with pytest.raises(utils.UserError, match="--fp16 is for --format onnx"):
        export(path, tmp_path / "a.pt2", "--arch", "vit_small", "--fp16", "true")
    # a model whose outputs we do not name: refused, naming the format it can take
    torch.save({}, tmp_path / "empty.pth")
    timm_vit = tmp_path / "timm_vit.pth"
    torch.save(backbones.build_backbone("vit_tiny_patch16_224")[0].state_dict(), timm_vit)
    with pytest.raises(utils.UserError, match="vit_tiny_patch16_224 cannot be exported to onnx or pt2 here .* "
                                              "export it with --format pth"):
        export(timm_vit, tmp_path / "t.onnx", "--arch", "vit_tiny_patch16_224")
    # a checkpoint without a backbone
    torch.save({"optimizer": {"state": {}}, "epoch": 3, "args": {"arch": "vit_small", "patch_size": 16}},
               tmp_path / "no_backbone.pth")
    proc = run_cmd([sys.executable, str(REPO_ROOT / "export_backbone.py"), tmp_path / "no_backbone.pth",
                    tmp_path / "x.onnx"], check=False)
    assert_one_error_line(proc, "no_backbone.pth")
    assert "teacher" in proc.stderr and not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_vits14_with_registers_and_antialiasing(tmp_path, fmt):
    path, model = backbone_file(tmp_path, "dinov2_vits14_reg4")
    out = tmp_path / f"reg.{fmt}"
    export(path, out, "--attention", "true")  # the architecture recognised from the weights
    _, meta = assert_same_as_pytorch(out, model, "dinov2_vits14_reg4",
                                     [(1, 518, 518), (2, 266, 266), (1, 140, 406), (1, 28, 42)])
    assert meta["outputs"] == ["cls_token", "patch_tokens", "register_tokens", "attention"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "convnext_atto"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_convnets_export_features_and_feature_map(tmp_path, arch, fmt):
    path, model = backbone_file(tmp_path, arch)
    out = tmp_path / f"{arch}.{fmt}"
    export(path, out, "--arch", arch)
    _, meta = assert_same_as_pytorch(out, model, arch, [(1, 224, 224), (2, 160, 160), (1, 256, 96)])
    assert meta["outputs"] == ["features", "feature_map"] and meta["multiple"] == 32


@pytest.mark.slow
def test_fp16_onnx_is_checked_or_said(vits16, tmp_path, capsys):
    path, model, _, _ = vits16
    out = tmp_path / "half.onnx"
    export(path, out, "--arch", "vit_small", "--fp16", "true")
    stdout = capsys.readouterr().out
    assert out.exists()
    assert "max |difference|" in stdout or "the fp16 file was not checked" in stdout


def test_missing_onnx_packages_are_named(vits16, tmp_path, monkeypatch):
    path, _, onnx_path, _ = vits16
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(utils.UserError, match="need onnx, onnxruntime and onnxscript"):
        export(path, tmp_path / "a.onnx", "--arch", "vit_small")
    with pytest.raises(utils.UserError, match="need onnx, onnxruntime and onnxscript"):
        exporting.OnnxBackbone(str(onnx_path))
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.slow
def test_external_data_goes_beside_the_onnx_file(vits16, tmp_path, monkeypatch):
    """Models past 1.5 GB of weights (ViT-g) keep them in NAME.onnx.data: the path, with a threshold of 0."""
    path, model, _, _ = vits16
    monkeypatch.setattr(exporting, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "big.onnx"
    export(path, out, "--arch", "vit_small", "--patch_size", 16)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert os.path.getsize(tmp_path / "big.onnx.data") > 80e6 > os.path.getsize(out)
    assert_same_as_pytorch(out, model, "vit_small", [(2, 160, 224)])
