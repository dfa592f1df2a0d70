"""Meta's DINOv2 files in our ViT: registers, LayerScale, SwiGLU and DINOv2's position-embedding interpolation
give the features of DINOv2's own model code.

`reference_dinov2.py` beside this file is a copy of DINOv2's `models/vision_transformer.py` and its layers
(without xFormers). Random weights of its hub models are saved with `torch.save(model.state_dict())`, which
is the format (and the keys) of Meta's released `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, loaded through
our loader (`checkpointing.load_pretrained_weights`, what every script's `--pretrained_weights` uses) into
`--arch dinov2_vit...`, and the CLS, register and patch tokens are compared with the reference's
`forward_features` dict at 224 px, at 518 px (the files' own grid), at a non-square size and with masks;
then through eval_knn.py, extract_features.py, export_backbone.py, visualize_attention.py, torch.hub and
main_dino.py. The official-DINO defaults of our ViT are checked by test_official_compat.py.
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, assert_one_error_line, image_folder, parse, run_cmd, script, split_folder
import reference_dinov2 as ref  # the reference beside this file (pytest puts tests/ on sys.path)

import backbones  # noqa: E402
import checkpointing  # noqa: E402
import data  # noqa: E402
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402

RTOL = 1e-5
# our --arch name: the reference's hub builder (Meta's hub names end in `_reg`, the files in `_reg4`)
CASES = {"dinov2_vits14": "dinov2_vits14", "dinov2_vits14_reg4": "dinov2_vits14_reg",
         "dinov2_vitb14": "dinov2_vitb14", "dinov2_vitb14_reg4": "dinov2_vitb14_reg"}
SIZES = ((224, 224), (518, 518), (224, 308))


def reference_model(builder: str, seed: int = 0) -> torch.nn.Module:
    """A reference hub model with random weights, LayerScale, registers and tokens far from their
    initialisation (gamma 1.0 and registers near 0 would hide a wrong order or a missing scale)."""
    torch.manual_seed(seed)
    model = getattr(ref, builder)().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name in ("register_tokens", "mask_token", "cls_token"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def meta_files(tmp_path_factory):
    """{our arch: (path of the Meta-format file, reference model)}."""
    root = tmp_path_factory.mktemp("dinov2_files")
    files = {}
    for i, (arch, builder) in enumerate(CASES.items()):
        model = reference_model(builder, seed=i)
        path = root / f"{arch}_pretrain.pth"
        torch.save(model.state_dict(), path)  # Meta's format: the backbone's plain state_dict
        files[arch] = (str(path), model)
    return files


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def loaded(arch: str, path: str, **kwargs) -> torch.nn.Module:
    model, _ = backbones.build_backbone(arch, 16, **kwargs)  # --patch_size 16 (the default) does not apply
    checkpointing.load_pretrained_weights(model, path, "teacher", arch, 14)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The model: keys and tokens
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CASES)
def test_meta_state_dict_loads_strictly_and_has_metas_keys(arch, meta_files):
    path, reference = meta_files[arch]
    ours = getattr(vits, arch)(masked_im_modeling=True)
    ours.load_state_dict(torch.load(path, weights_only=True), strict=True)  # every key, every shape
    expected = {"cls_token", "pos_embed", "mask_token", "blocks.0.ls1.gamma", "blocks.11.ls2.gamma", "norm.weight"}
    assert expected <= set(ours.state_dict())
    assert ours.pos_embed.shape[1] == 1 + 37 * 37  # the 518 px grid of Meta's files
    assert ("register_tokens" in ours.state_dict()) == arch.endswith("_reg4") and ours.patch_embed.patch_size == 14
    assert ours.num_prefix_tokens == (5 if arch.endswith("_reg4") else 1)


@pytest.mark.parametrize("arch", CASES)
def test_tokens_equal_dinov2s_at_224_518_and_non_square(arch, meta_files):
    path, reference = meta_files[arch]
    ours = loaded(arch, path)
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        with torch.no_grad():
            expected, got = reference.forward_features(x), ours.forward_tokens(x)
            features = ours(x)  # what eval_knn.py takes: the normalised CLS token
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
            assert got[key].shape == expected[key].shape, (key, h, w)
            if expected[key].numel():
                assert relative_error(got[key], expected[key]) <= RTOL, (key, h, w)
        assert relative_error(features, expected["x_norm_clstoken"]) <= RTOL
        # the official interface around them: all tokens in order, CLS + registers first
        tokens = ours.forward_features(x)
        assert torch.equal(tokens[:, ours.num_prefix_tokens:], got["x_norm_patchtokens"])


@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg4"])
def test_masked_tokens_equal_dinov2s(arch, meta_files):
    """iBOT masking through the mask token: the masked patches become the mask token before the position
    embedding, as in DINOv2's `prepare_tokens_with_masks`; the registers are never masked."""
    path, reference = meta_files[arch]
    ours = loaded(arch, path, masked_im_modeling=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 224, 224, generator=g)
    masks = torch.rand(2, 16 * 16, generator=g) < 0.4
    with torch.no_grad():
        assert relative_error(ours.prepare_tokens(x, masks), reference.prepare_tokens_with_masks(x, masks)) <= RTOL
        expected, got = reference.forward_features(x, masks), ours.forward_tokens(x, masks.view(2, 16, 16))
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        if expected[key].numel():
            assert relative_error(got[key], expected[key]) <= RTOL, key
    assert not torch.allclose(got["x_norm_clstoken"], ours.forward_tokens(x)["x_norm_clstoken"])  # masks matter


def test_intermediate_layers_and_attention_with_registers(meta_files):
    """get_intermediate_layers returns every token (CLS, registers, patches; DINOv2's returns the patches and
    the CLS token); the attention maps cover them all, and visualize_attention shows the patches."""
    import visualize_attention
    path, reference = meta_files["dinov2_vits14_reg4"]
    ours = loaded("dinov2_vits14_reg4", path)
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        layers = ours.get_intermediate_layers(x, 2)
        expected = reference.get_intermediate_layers(x, 2, return_class_token=True)
        attention = ours.get_last_selfattention(x)
        maps = visualize_attention.cls_attention(ours, x)
    for tokens, (patches, cls) in zip(layers, expected):
        assert tokens.shape[1] == 1 + 4 + 4 * 5
        assert relative_error(tokens[:, 0], cls) <= RTOL and relative_error(tokens[:, 5:], patches) <= RTOL
    assert attention.shape == (1, 6, 25, 25) and maps.shape == (6, 20)
    assert torch.equal(maps, attention[0, :, 0, 5:].float())  # the CLS query over the 4 x 5 patches


def test_linear_probe_and_extracted_patch_features_leave_the_registers_out(meta_files, tmp_path):
    """eval_linear.py's avgpool feature and extract_features.py's patch feature average the patch tokens,
    not the registers."""
    import extract_features
    path, reference = meta_files["dinov2_vits14_reg4"]
    ours = loaded("dinov2_vits14_reg4", path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = reference.forward_features(x)
        linear = backbones.linear_features(ours, x, 1, avgpool=True, vit=True)
        patch = extract_features.feature_forward(ours, patch_tokens=True)(x)
    want = torch.cat([expected["x_norm_clstoken"], expected["x_norm_patchtokens"].mean(dim=1)], dim=1)
    assert relative_error(linear, want) <= RTOL and relative_error(patch, want) <= RTOL


def test_vit_g_swiglu_builds_metas_shapes_and_computes_dinov2s_feed_forward():
    """ViT-g/14 (1.1B parameters) on the meta device: the keys and shapes of Meta's file; the SwiGLU block
    itself equals the reference's on a small model."""
    with torch.device("meta"):
        ours, theirs = vits.dinov2_vitg14_reg4(masked_im_modeling=True), ref.dinov2_vitg14_reg()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.state_dict()["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    torch.manual_seed(0)
    small_ref = ref.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                          init_values=1.0, ffn_layer="swiglufused", block_chunks=0).eval()
    small = vits.VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, qkv_bias=True,
                                   norm_layer=vits.partial(torch.nn.LayerNorm, eps=1e-6), init_values=1.0,
                                   ffn_layer="swiglu", masked_im_modeling=True).eval()
    small.load_state_dict(small_ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        assert relative_error(small(x), small_ref(x)) <= RTOL


# ----------------------------------------------------------------------------------------------------
# Files that do not fit: one message each
# ----------------------------------------------------------------------------------------------------
def test_files_that_do_not_fit_stop_with_one_clear_message(meta_files, tmp_path):
    reg4, _ = meta_files["dinov2_vits14_reg4"]
    plain, _ = meta_files["dinov2_vits14"]
    cases = [
        (reg4, "dinov2_vits14", "register tokens: 4 in the file, 0 in the model. It is Meta's DINOv2 "
                                "dinov2_vits14_reg4: use --arch dinov2_vits14_reg4"),
        (plain, "dinov2_vits14_reg4", "register tokens: 0 in the file, 4 in the model. It is Meta's DINOv2 "
                                      "dinov2_vits14: use --arch dinov2_vits14"),
        (plain, "vit_small", "LayerScale: yes in the file, no in the model; patch size: 14 in the file, 16 in the "
                             "model. It is Meta's DINOv2 dinov2_vits14: use --arch dinov2_vits14"),
    ]
    with torch.device("meta"):
        vit_g = ref.dinov2_vitg14()
    g_path = tmp_path / "dinov2_vitg14_pretrain.pth"
    # a ViT-g's keys and shapes, small tensors: what the message needs (the check runs before any shape test)
    g_state = {k: torch.zeros(v.shape) if v.numel() < 10_000 or k in ("patch_embed.proj.weight",) else
               torch.zeros(1) for k, v in vit_g.state_dict().items() if k.startswith(("patch_embed", "blocks.0.",
                                                                                    "cls_token"))}
    torch.save(g_state, g_path)
    cases.append((str(g_path), "dinov2_vitl14", "feed-forward: SwiGLU (ViT-g) in the file, MLP in the model"))
    torch.save(vits.vit_small(patch_size=16).state_dict(), tmp_path / "ours16.pth")
    cases.append((str(tmp_path / "ours16.pth"), "dinov2_vits14", "LayerScale: no in the file, yes in the model; "
                  "patch size: 16 in the file, 14 in the model. Use the --arch and --patch_size of the run"))
    for path, arch, message in cases:
        with pytest.raises(utils.UserError, match="does not fit") as e:
            backbones.build_eval_model(arch, 16, path, "teacher", torch.device("cpu"))
        assert message in str(e.value), str(e.value)
    # the command line: one error line, no traceback
    root = split_folder(image_folder(tmp_path / "imgs", n_per_class=2, size=28), tmp_path / "split")
    proc = run_cmd(script("eval_knn.py", "--arch", "dinov2_vits14", "--pretrained_weights", reg4, "--data_path", root,
                          "--resize_size", 28, "--crop_size", 28, "--num_workers", 0), check=False)
    assert_one_error_line(proc, "use --arch dinov2_vits14_reg4")


# ----------------------------------------------------------------------------------------------------
# Through the scripts
# ----------------------------------------------------------------------------------------------------
def _reference_features(model, dataset, size):
    from PIL import Image
    transform = data.eval_transform(size, size)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in dataset.samples])
    with torch.no_grad():
        return model(images)  # DINOv2's forward: the normalised CLS token (x_norm_clstoken)


def test_eval_knn_and_extract_features_give_dinov2s_cls_token(meta_files, tmp_path):
    import eval_knn
    import extract_features
    path, reference = meta_files["dinov2_vits14_reg4"]
    root = split_folder(image_folder(tmp_path / "imgs", n_per_class=3, size=48), tmp_path / "split")
    dump = tmp_path / "feats"
    eval_knn.eval_knn(parse(eval_knn, "--arch", "dinov2_vits14_reg4", "--pretrained_weights", path, "--data_path",
                            root, "--resize_size", 42, "--crop_size", 42, "--dump_features", dump, "--nb_knn", 1,
                            "--num_workers", 0, "--batch_size_per_gpu", 4))
    dataset_train, dataset_val = data.labeled_splits(str(root), 42, 42)
    for name, dataset in (("trainfeat.pth", dataset_train), ("testfeat.pth", dataset_val)):
        expected = F.normalize(_reference_features(reference, dataset, 42), dim=1)
        assert relative_error(torch.load(dump / name, weights_only=True), expected) <= RTOL, name

    out = tmp_path / "extracted"
    extract_features.extract_features(parse(extract_features, "--arch", "dinov2_vits14_reg4", "--pretrained_weights",
                                            path, "--data_path", root / "train", "--resize_size", 42, "--crop_size",
                                            42, "--normalize", "false", "--output_dir", out, "--num_workers", 0))
    features = torch.from_numpy(np.load(out / "features.npy"))
    assert relative_error(features, _reference_features(reference, dataset_train, 42)) <= RTOL


def test_export_backbone_reads_a_meta_file_and_names_its_architecture(meta_files, tmp_path, capsys):
    import export_backbone
    path, _ = meta_files["dinov2_vits14_reg4"]
    out = tmp_path / "backbone.pth"
    export_backbone.export_backbone(export_backbone.get_args_parser().parse_args([path, str(out)]))
    assert "is Meta's DINOv2 dinov2_vits14_reg4 (from its weights)" in capsys.readouterr().out
    exported, original = torch.load(out, weights_only=True), torch.load(path, weights_only=True)
    assert set(exported) == set(original) - {"mask_token"}  # a training-only input, as for our students
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    with pytest.raises(utils.UserError, match="register tokens: 4 in the file, 0 in the model"):
        export_backbone.export_backbone(export_backbone.get_args_parser().parse_args(
            [path, str(tmp_path / "x.pth"), "--arch", "dinov2_vits14"]))


def test_torch_hub_entry_loads_a_local_meta_file(meta_files):
    path, reference = meta_files["dinov2_vitb14_reg4"]
    model = torch.hub.load(str(REPO_ROOT), "dinov2_vitb14_reg", source="local", weights=path).eval()
    x = torch.randn(1, 3, 70, 56)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) <= RTOL


def test_main_dino_continues_from_a_meta_file(meta_files, tmp_path):
    """--pretrained_weights with Meta's file and --arch dinov2_vits14_reg4: the student and the teacher start
    from it (the mask token, a training-only input, left out); crops are checked against its 14 px patches."""
    import main_dino
    path, reference = meta_files["dinov2_vits14_reg4"]
    with pytest.raises(utils.UserError, match="--global_crops_size 64 is not a multiple of the patch size of "
                                              "dinov2_vits14_reg4, 14"):
        main_dino.check_args(parse(main_dino, "--arch", "dinov2_vits14_reg4", "--global_crops_size", 64))
    args = parse(main_dino, "--arch", "dinov2_vits14_reg4", "--pretrained_weights", path, "--global_crops_size", 28,
                 "--local_crops_size", 14, "--out_dim", 32, "--output_dir", tmp_path)
    main_dino.check_args(args)
    args.rank, args.world_size, args.gpu, args.device = 0, 1, 0, torch.device("cpu")
    run = main_dino.build_training(args, niter_per_ep=1)
    expected = torch.load(path, weights_only=True)
    for network in (run.student, run.teacher):
        state = network.backbone.state_dict()
        assert set(state) == set(expected) - {"mask_token"}
        assert all(torch.equal(state[k], expected[k]) for k in state)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert relative_error(run.teacher.backbone.eval()(x), reference(x)) <= RTOL


def test_the_official_dino_models_keep_their_keys():
    """The DINOv2 options are off by default: no register, LayerScale or SwiGLU key in vit_small."""
    keys = set(vits.vit_small(patch_size=16).state_dict())
    assert not {k for k in keys if "ls1" in k or "ls2" in k or "w12" in k or k == "register_tokens"}
    assert sys.modules["vision_transformer"] is vits
