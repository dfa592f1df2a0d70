"""eval_knn.py: the official weighted vote, feature extraction in dataset order (one and two processes),
every weight format it reads, feature dumps, and the online k-NN of main_dino.py."""
import argparse
import json
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import REPO_ROOT, assert_one_error_line, parse, run_cmd, torchrun
import backbones
import data
import eval_knn
import official_dino as ref
import utils
import vision_transformer as vits

PY = sys.executable


# --------------------------------------------------------------------------------------------------
# knn_classifier
# --------------------------------------------------------------------------------------------------
def random_features(n_train, n_test, dim=32, classes=10, seed=0):
    """Clustered unit features: classes overlap enough that k-NN makes mistakes (no trivial 100%)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    train_l = torch.randint(0, classes, (n_train,), generator=g)
    test_l = torch.randint(0, classes, (n_test,), generator=g)
    train_f = nn.functional.normalize(centers[train_l] + 1.5 * torch.randn(n_train, dim, generator=g), dim=1)
    test_f = nn.functional.normalize(centers[test_l] + 1.5 * torch.randn(n_test, dim, generator=g), dim=1)
    return train_f, train_l, test_f, test_l


@pytest.mark.parametrize("k", [1, 10, 20, 100, 200])
@pytest.mark.parametrize("n_test,num_classes", [(300, 1000), (1000, 10), (250, 37)])
def test_knn_classifier_equals_official(k, n_test, num_classes):
    train_f, train_l, test_f, test_l = random_features(2000, n_test, classes=min(num_classes, 10), seed=k)
    ours = eval_knn.knn_classifier(train_f, train_l, test_f, test_l, k, 0.07, num_classes)
    official = ref.knn_classifier(train_f, train_l, test_f, test_l, k, 0.07, num_classes)
    assert ours == pytest.approx(official, abs=1e-9)
    assert 10 < ours[0] < 100  # a real classification problem, not a degenerate one


def test_knn_classifier_hand_computed():
    # Training set on a circle; the test point sits near class 1's single sample and far from class 0's
    # two: an unweighted 3-NN majority says 0, the exp(cos/T) weighting says 1.
    angles = torch.tensor([0.0, 0.5, 0.55, 3.0])
    train_f = torch.stack([angles.cos(), angles.sin()], 1)
    train_l = torch.tensor([1, 0, 0, 2])
    test_f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test_l = torch.tensor([1, 0])
    T = 0.07
    # by hand for the first test point: weights exp(cos(angle)/T) per class
    w1 = torch.tensor(1.0 / T).exp()
    w0 = (angles[1].cos() / T).exp() + (angles[2].cos() / T).exp()
    assert w1 > w0  # class 1 wins the weighted vote...
    top1, top5 = eval_knn.knn_classifier(train_f, train_l, test_f, test_l, k=3, T=T, num_classes=3)
    assert top1 == 100.0 and top5 == 100.0
    # ...and at a high temperature the weights even out and the majority (class 0) wins
    top1, _ = eval_knn.knn_classifier(train_f, train_l, test_f[:1], test_l[:1], k=3, T=100.0, num_classes=3)
    assert top1 == 0.0


def test_knn_classifier_small_test_sets_where_official_fails():
    train_f, train_l, test_f, test_l = random_features(50, 7, classes=3)
    with pytest.raises(ValueError):  # official: 7 // 100 = 0 images per chunk -> range() step 0
        ref.knn_classifier(train_f, train_l, test_f, test_l, 20, 0.07, 5)
    top1, top5 = eval_knn.knn_classifier(train_f, train_l, test_f, test_l, 20, 0.07, num_classes=5)
    # the same answer as the official function gives on the 7 images repeated up to 700
    rep = ref.knn_classifier(train_f, train_l, test_f.repeat(100, 1), test_l.repeat(100), 20, 0.07, 5)
    assert (top1, top5) == pytest.approx(rep)
    # k larger than the training set, fewer than 5 classes (the official top-5 fails on both)
    with pytest.raises(RuntimeError):
        ref.knn_classifier(train_f, train_l, test_f.repeat(100, 1), test_l.repeat(100), 20, 0.07, 3)
    top1, top5 = eval_knn.knn_classifier(train_f[:4], train_l[:4], test_f, test_l, 200, 0.07, num_classes=3)
    assert 0 <= top1 <= top5 == 100.0
    with pytest.raises(utils.UserError, match="at least one test image"):
        eval_knn.knn_classifier(train_f, train_l, test_f[:0], test_l[:0], 20, 0.07)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def official_vit_tiny(seed=0):
    torch.manual_seed(seed)
    model = ref.vit_tiny(patch_size=16).eval()
    with torch.no_grad():  # non-trivial weights everywhere, so that every tensor matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def official_full_checkpoint(backbone: nn.Module, out_dim=64) -> dict:
    """The layout of an official main_dino.py checkpoint: MultiCropWrapper teacher, DDP student, Namespace."""
    torch.manual_seed(1)
    wrapper = ref.MultiCropWrapper(backbone, ref.DINOHead(192, out_dim))
    teacher = wrapper.state_dict()
    return {"student": {"module." + k: v.clone() for k, v in teacher.items()}, "teacher": teacher,
            "optimizer": {}, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
            "dino_loss": {"center": torch.zeros(1, out_dim)}}


def test_load_official_full_and_backbone_only_checkpoints(tmp_path, capsys):
    official = official_vit_tiny()
    full = tmp_path / "checkpoint.pth"
    torch.save(official_full_checkpoint(official), full)
    backbone_only = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(official.state_dict(), backbone_only)
    x = torch.randn(2, 3, 64, 96)
    expected = official(x)
    for path, key in ((full, "teacher"), (full, "student"), (backbone_only, "teacher"), (backbone_only, None)):
        model = vits.vit_tiny(patch_size=16).eval()
        utils.load_pretrained_weights(model, str(path), key, "vit_tiny", 16)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    out = capsys.readouterr().out
    assert "ignored 8 tensors of other modules (head)" in out  # DINOHead of the full checkpoint


def test_load_our_main_dino_checkpoint_and_timm_and_torchvision(tmp_path):
    # ours: the teacher of a main_dino.py checkpoint (MultiCropWrapper of a timm backbone)
    backbone, dim = backbones.build_backbone("resnet18")
    wrapper = utils.MultiCropWrapper(backbone, vits.DINOHead(dim, 32))
    torch.save({"teacher": wrapper.state_dict(), "student": {"module." + k: v for k, v in wrapper.state_dict().items()},
                "args": {"arch": "resnet18"}}, tmp_path / "ours.pth")
    model, _ = backbones.build_backbone("resnet18")
    utils.load_pretrained_weights(model, str(tmp_path / "ours.pth"), "teacher", "resnet18")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, backbone.state_dict()[k])
    # a torchvision classification state dict (with its fc) loads into the headless backbone
    import torchvision
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model, _ = backbones.build_backbone("resnet18")
    utils.load_pretrained_weights(model, str(tmp_path / "tv.pth"), "teacher", "resnet18")
    torch.testing.assert_close(model.conv1.weight, tv.conv1.weight)
    # a timm model by name
    timm_model, _ = backbones.build_backbone("resnet10t")
    torch.save({"model": timm_model.state_dict()}, tmp_path / "timm.pth")
    model, _ = backbones.build_backbone("resnet10t")
    utils.load_pretrained_weights(model, str(tmp_path / "timm.pth"), "teacher", "resnet10t")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), timm_model.eval()(x))


def test_mismatched_checkpoint_is_one_clear_message(tmp_path):
    torch.save(official_vit_tiny().state_dict(), tmp_path / "tiny16.pth")
    with pytest.raises(utils.UserError) as e:
        utils.load_pretrained_weights(vits.vit_tiny(patch_size=8), str(tmp_path / "tiny16.pth"), "teacher", "vit_tiny", 8)
    msg = str(e.value)
    assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16) vs model (192, 3, 8, 8)" in msg
    assert "--patch_size" in msg and "\n" not in msg
    with pytest.raises(utils.UserError, match="150 with other shapes"):
        utils.load_pretrained_weights(vits.vit_small(), str(tmp_path / "tiny16.pth"), "teacher", "vit_small")
    shallow = vits.VisionTransformer(patch_size=16, embed_dim=192, depth=6, num_heads=3, qkv_bias=True)
    torch.save(shallow.state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(utils.UserError, match=r"72 missing \(blocks.6.norm1.weight"):
        utils.load_pretrained_weights(vits.vit_tiny(), str(tmp_path / "shallow.pth"), "teacher")
    torch.save({"teacher": {}, "epoch": 1, "args": {}}, tmp_path / "empty.pth")
    with pytest.raises(utils.UserError, match="missing"):
        utils.load_pretrained_weights(vits.vit_tiny(), str(tmp_path / "empty.pth"), "teacher")
    torch.save({"optimizer": {"x": torch.zeros(1)}, "epoch": 1}, tmp_path / "nokey.pth")
    with pytest.raises(utils.UserError, match="use --checkpoint_key with one of optimizer"):
        utils.load_pretrained_weights(vits.vit_tiny(), str(tmp_path / "nokey.pth"), "teacher")


def test_no_weights_is_a_loud_warning_and_seeded(capsys):
    model = vits.vit_tiny()
    utils.load_pretrained_weights(model, "", "teacher", "vit_tiny", 16)
    assert "RANDOMLY INITIALISED vit_tiny" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Feature extraction and the script
# --------------------------------------------------------------------------------------------------
def make_image_folder(root, per_class=(4, 3), size=40, seed=0):
    """train/ and val/ with distinct, reproducible images (odd counts: the 2-rank sampler pads)."""
    g = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (torch.rand(size, size + 8, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def official_features(model, root, split, resize, crop):
    dataset = data.build_dataset(str(root / split))
    tf = data.eval_transform(resize, crop)
    with torch.no_grad():
        feats = torch.cat([model(tf(data.pil_loader_rgb(p))[None]) for p, _ in dataset.samples])
    return nn.functional.normalize(feats, dim=1), torch.tensor([t for _, t in dataset.samples])


def test_eval_knn_dump_features_of_official_checkpoint(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=(5, 4))
    official = official_vit_tiny()
    torch.save(official_full_checkpoint(official), tmp_path / "checkpoint.pth")
    dump = tmp_path / "feats"
    proc = run_cmd([PY, REPO_ROOT / "eval_knn.py", "--arch", "vit_tiny", "--patch_size", "16",
                    "--pretrained_weights", tmp_path / "checkpoint.pth", "--checkpoint_key", "teacher",
                    "--data_path", root, "--resize_size", "36", "--crop_size", "32", "--nb_knn", "1", "3", "100",
                    "--num_workers", "1", "--batch_size_per_gpu", "3", "--dump_features", dump])
    assert "1-NN classifier result: Top1:" in proc.stdout and "100-NN classifier result" in proc.stdout
    for split, feat_name, label_name in (("train", "trainfeat.pth", "trainlabels.pth"),
                                         ("val", "testfeat.pth", "testlabels.pth")):
        expected_f, expected_l = official_features(official, root, split, 36, 32)
        torch.testing.assert_close(torch.load(dump / feat_name), expected_f, rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.load(dump / label_name), expected_l)
    # --load_features gives the same classification without touching the images or the model
    again = eval_knn.eval_knn(parse(eval_knn, "--load_features", dump, "--nb_knn", 1, 3, 100))
    lines = [line for line in proc.stdout.splitlines() if "NN classifier result" in line]
    assert [f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}" for k, top1, top5 in again] == lines


def test_eval_knn_two_processes_gather_in_dataset_order(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=(4, 3))  # 8 train, 6 val: odd shares per rank? 4/3
    (root / "val" / "b" / "2.png").unlink()  # 5 val images: rank 1 gets a padded duplicate
    common = ["--arch", "vit_tiny", "--data_path", root, "--resize_size", "32", "--crop_size", "32",
              "--nb_knn", "2", "--num_workers", "0", "--batch_size_per_gpu", "2", "--use_cuda", "false"]
    eval_knn.eval_knn(parse(eval_knn, *common, "--dump_features", tmp_path / "one"))
    run_cmd(torchrun("eval_knn.py", *common, "--dump_features", tmp_path / "two"), timeout=300)
    for name in eval_knn.FEATURE_FILES:
        one, two = torch.load(tmp_path / "one" / name), torch.load(tmp_path / "two" / name)
        assert one.shape == two.shape and one.shape[0] in (8, 5)
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


def test_gather_in_order_layout():
    # rank r holds rows r, r+W, ... of the padded order: simulate 3 ranks over 7 samples without a group
    n, world = 7, 3
    padded = list(range(n)) + list(range(n))[: (-n) % world]
    shards = [torch.tensor(padded[r::world], dtype=torch.float32)[:, None] for r in range(world)]
    stacked = torch.stack(shards, dim=1).flatten(0, 1)[:n]
    assert stacked[:, 0].tolist() == list(range(n))
    loader_indices = [list(data.build_eval_loader(list(range(n)), 1, 0, r, world).sampler) for r in range(world)]
    assert loader_indices == [padded[r::world] for r in range(world)]


def test_unreadable_image_left_out_and_named(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_class=(3, 2))
    (root / "val" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    eval_knn.eval_knn(parse(eval_knn, "--arch", "vit_tiny", "--data_path", root, "--resize_size", "32",
                            "--crop_size", "32", "--nb_knn", "2", "--num_workers", "0",
                            "--dump_features", tmp_path / "f"))
    stdout = capsys.readouterr().out
    assert f"unreadable val image left out of the evaluation: {root / 'val' / 'a' / 'broken.jpg'}" in stdout
    assert torch.load(tmp_path / "f" / "testfeat.pth").shape[0] == 4


@pytest.mark.parametrize("args, expected", [
    (["--data_path", "{tmp}/only_train"], "has no val/ folder"),
    (["--data_path", "{tmp}/nowhere"], "has no train/ folder"),
    (["--load_features", "{tmp}"], "lacks trainfeat.pth"),
    (["--data_path", "synthetic", "--pretrained_weights", "{tmp}/missing.pth"], "does not exist"),
    (["--data_path", "synthetic", "--nb_knn", "0"], "--nb_knn"),
])
def test_eval_knn_user_errors(tmp_path, args, expected):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(utils.UserError, match=expected):
        eval_knn.eval_knn(parse(eval_knn, "--arch", "vit_tiny", *[a.format(tmp=tmp_path) for a in args]))


def test_a_user_error_from_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cmd([PY, REPO_ROOT / "eval_knn.py", "--arch", "vit_tiny", "--data_path", tmp_path / "nowhere"],
                   check=False, timeout=120)
    assert_one_error_line(proc, "has no train/ folder")


# --------------------------------------------------------------------------------------------------
# Online k-NN and curves in main_dino.py
# --------------------------------------------------------------------------------------------------
def test_main_dino_online_knn_logs_accuracy_and_curves(tmp_path, capsys):
    import main_dino
    root = make_image_folder(tmp_path / "data", per_class=(6, 3), size=48)
    out = tmp_path / "run"
    main_dino.train_dino(parse(
        main_dino, "--arch", "vit_tiny", "--patch_size", "16", "--data_path", root / "train", "--global_crops_size",
        "32", "--local_crops_size", "16", "--local_crops_number", "1", "--out_dim", "64", "--batch_size_per_gpu", "4",
        "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "0", "--knn_data_path", root, "--knn_eval_freq", "2",
        "--output_dir", out))
    assert "Online 20-NN of the teacher: top-1" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [("knn_top1" in r) for r in records] == [False, True, True]  # every 2nd epoch and the last
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in records if "knn_top1" in r)
    for key in ("train_loss", "train_lr", "train_wd", "train_teacher_momentum", "train_teacher_temp"):
        assert all(key in r for r in records)
    assert (out / "training_curves.png").stat().st_size > 1000
    # the online k-NN uses eval_knn's code: the same teacher evaluated offline gives the same accuracy
    [(k, top1, _)] = eval_knn.eval_knn(parse(
        eval_knn, "--arch", "vit_tiny", "--pretrained_weights", out / "checkpoint.pth", "--data_path", root,
        "--resize_size", "37", "--crop_size", "32", "--nb_knn", "20", "--num_workers", "0",
        "--batch_size_per_gpu", "4"))
    assert k == 20 and top1 == pytest.approx(records[-1]["knn_top1"])
