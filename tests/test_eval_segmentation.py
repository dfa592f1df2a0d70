"""eval_segmentation.py: DINOv2's linear head and mmsegmentation's mIoU (against reference copies), the shape masks,
a whole run (several heads, pictures, resume after a signal, torchrun), every kind of backbone, and the bad inputs
that must end in one clear message. Tiny: vit_tiny on 32 px shapes, 20 train and 10 val pairs."""
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import eval_segmentation as es
import segmentation_data
import synthetic
import utils
from conftest import (REPO_ROOT, assert_one_error_line, load_checkpoint, parse, read_log, run_cmd, script, stop_when,
                      torchrun)
from reference_dinov2_segmentation import make_bn_head, summary, total_area_to_metrics, total_intersect_and_union

TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--resize_size", "32", "--crop_size", "32", "--num_classes", 11,
        "--batch_size_per_gpu", 4, "--num_workers", 0, "--print_freq", 1, "--num_pictures", 3]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated shapes with their masks: 2 train and 1 val image per class, 32 px."""
    cache = tmp_path_factory.mktemp("shapes")
    return Path(synthetic.make_synthetic_segmentation(str(cache), 2, 1, 32))


def run(*argv):
    return es.eval_segmentation(parse(es, *argv))


# ----------------------------------------------------------------------------------------------------
# Equality with DINOv2's head and mmsegmentation's metrics
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 4])
def test_head_and_loss_equal_dinov2_bnhead(layers):
    torch.manual_seed(0)
    embed_dim, num_classes = 24, 7
    reference = make_bn_head(embed_dim, layers, num_classes)
    ours = es.LinearSegmentationHead(embed_dim * layers, num_classes)
    ours.load_state_dict(reference.state_dict())  # the same keys: bn.*, conv_seg.*
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.load_state_dict(ours.state_dict())
    maps = [torch.randn(3, embed_dim, 4, 5) for _ in range(layers)]
    target = torch.randint(0, num_classes, (3, 1, 32, 40))
    target[:, :, :5] = 255  # ignored rows
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(reference, mode)()
        out, ref_out = ours(maps), reference(list(maps))
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        loss = es.segmentation_loss(out, target[:, 0], 255)
        ref_loss = reference.losses(ref_out, target)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    # the gradients of both heads agree too (train mode: the batch statistics are in the graph)
    ours.train(), reference.train()
    es.segmentation_loss(ours(maps), target[:, 0], 255).backward()
    reference.losses(reference(list(maps)), target).backward()
    ref_params = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-8)
    # a fresh head starts as mmsegmentation's: conv_seg ~ N(0, 0.01), bias 0
    fresh = es.LinearSegmentationHead(512, 150)
    assert abs(fresh.conv_seg.weight.std().item() - 0.01) < 1e-3 and not fresh.conv_seg.bias.any()


def test_metrics_equal_mmsegmentation():
    rng = np.random.default_rng(0)
    num_classes, ignore = 6, 255
    preds, labels = [], []
    for _ in range(5):
        label = rng.integers(0, num_classes - 1, (20, 24))  # class 5 never labelled...
        label[rng.random(label.shape) < 0.1] = ignore
        pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, num_classes, label.shape))
        pred[pred == ignore] = 0
        preds.append(pred), labels.append(label)
    preds[0][0, 0] = 5  # ...but predicted once: its IoU is 0, counted in the mean
    counts = sum(es.area_counts(torch.from_numpy(p), torch.from_numpy(t), num_classes, ignore)
                 for p, t in zip(preds, labels))
    ours = es.segmentation_metrics(counts)
    ref = total_area_to_metrics(*total_intersect_and_union(preds, labels, num_classes, ignore))
    assert ours["mIoU"] == pytest.approx(100 * np.nanmean(ref["IoU"]), abs=1e-9)
    assert ours["mAcc"] == pytest.approx(100 * np.nanmean(ref["Acc"]), abs=1e-9)
    assert ours["aAcc"] == pytest.approx(100 * float(ref["aAcc"]), abs=1e-9)
    assert summary(ref)["mIoU"] == round(ours["mIoU"], 2)
    assert ours["IoU"][5] == 0.0
    # a class absent from labels and predictions has no IoU and is left out of the mean (nan in mmseg)
    counts[:, 4] = 0
    without = es.segmentation_metrics(counts)
    assert np.isnan(without["IoU"][4])
    assert without["mIoU"] == pytest.approx(np.mean([v for i, v in enumerate(without["IoU"]) if i != 4]))


def test_reduce_zero_label_maps_as_mmsegmentation(tmp_path):
    (tmp_path / "img").mkdir(), (tmp_path / "mask").mkdir()
    raw = np.array([[0, 1, 2, 150], [255, 3, 0, 149]], dtype=np.uint8)
    Image.fromarray(np.zeros((2, 4, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(raw).save(tmp_path / "mask" / "a.png")
    # an identity transform: the label map itself is compared
    identity = lambda image, mask: (torch.zeros(3, 2, 4), torch.from_numpy(np.array(mask, dtype=np.int64)))  # noqa
    dataset = segmentation_data.SegmentationDataset(
        segmentation_data.list_pairs(str(tmp_path / "img"), str(tmp_path / "mask")), identity, num_classes=150,
        reduce_zero_label=True)
    _, target, error = dataset[0]
    assert error == ""
    from reference_dinov2_segmentation import intersect_and_union
    # mmseg's mapping, read back from its label counts: every pixel predicted as its own mapped class
    expected = torch.tensor([[255, 0, 1, 149], [255, 2, 255, 148]])
    assert torch.equal(target, expected)
    inter, _, _, area_label = intersect_and_union(expected.numpy(), raw.astype(np.int64), 150, 255,
                                                  reduce_zero_label=True)
    assert area_label.sum() == 5 and inter.sum() == 5


# ----------------------------------------------------------------------------------------------------
# The shape masks
# ----------------------------------------------------------------------------------------------------
def test_shape_masks_belong_to_the_unchanged_images(tmp_path):
    images_root = synthetic.make_synthetic_dataset(str(tmp_path), 2, 1, 32)
    seg_root = synthetic.make_synthetic_segmentation(str(tmp_path), 2, 1, 32)
    for split in ("train", "val"):
        for c, cls in enumerate(synthetic.SYNTHETIC_CLASSES):
            for path in sorted((tmp_path / images_root / split / cls).iterdir()):
                same = os.path.join(seg_root, split, "images", path.name)
                assert path.read_bytes() == open(same, "rb").read(), "the same pixels as the classification data"
                image = np.asarray(Image.open(same).convert("L"), dtype=np.float32) / 255
                mask = np.asarray(Image.open(os.path.join(seg_root, split, "masks", path.name)))
                assert set(np.unique(mask)) <= {0, c + 1} and (mask == c + 1).any()
                # shapes are light (0.88) on dark (0.12): the mask follows the pixels but for noise and edges
                bright = image > 0.5
                assert (bright == (mask > 0)).mean() > 0.97
    # the classification images of the quickstart keep their cache name (and so their figures)
    assert os.path.basename(images_root) == "synthetic-shapes-v2-s32-n2-1-seed0"


# ----------------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------------
def test_run_reports_every_head_and_draws_predictions(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    result = run("--data_path", shapes, "--output_dir", out, "--epochs", 2, "--lrs", 1e-3, 1e-2, *TINY)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    for record in log:
        for key in ("test_mIoU_lr0.001", "test_mIoU_lr0.01", "test_aAcc_lr0.001", "train_loss_lr0.01", "test_mIoU"):
            assert key in record and np.isfinite(record[key]), key
        assert record["test_mIoU"] == max(record["test_mIoU_lr0.001"], record["test_mIoU_lr0.01"])
    assert len(log[-1]["test_IoU"]) == 11
    assert result["best"]["stats"]["mIoU"] == max(r["test_mIoU"] for r in log)
    picture = Image.open(out / "predictions.png")
    # 3 rows of image | mask | prediction, each enlarged from 32 to 128 px, 4 px gaps
    assert picture.size == (3 * 128 + 2 * 4, 3 * 128 + 2 * 4)
    stdout = capsys.readouterr().out
    assert "Patch features: 1 layer(s), 192 channels on a 2x2 grid for 32 px crops." in stdout
    # the same command again: nothing to train, the same figures
    again = run("--data_path", shapes, "--output_dir", out, "--epochs", 2, "--lrs", 1e-3, 1e-2, *TINY)
    assert again["best"]["stats"] == result["best"]["stats"] and len(read_log(out)) == 2
    with pytest.raises(utils.UserError, match="belongs to another run"):
        run("--data_path", shapes, "--output_dir", out, "--epochs", 2, "--lrs", 1e-3, *TINY)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(shapes, tmp_path):
    # batches of 1: 20 iterations an epoch, so that the signal lands inside the epoch even when a loaded machine
    # lets the run print a page of lines ahead of the one matched (stop_when)
    common = ["--data_path", shapes, "--epochs", 2, "--lrs", 1e-3, 1e-2, *TINY, "--num_pictures", 0,
              "--batch_size_per_gpu", 1]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run(*common, "--output_dir", ref)
    cmd = script("eval_segmentation.py", *common, "--output_dir", stopped, "--num_workers", 1)
    code, out = stop_when(cmd, r"Epoch: \[1\]\s+\[\s*1/20\]", lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]
    batches = load_checkpoint(stopped / "checkpoint.pth")["position"]["batches"]
    assert 2 <= batches < 20
    proc = run_cmd(cmd)
    assert f"Resuming epoch 1 at batch {batches} of 20" in proc.stdout
    a, b = read_log(ref), read_log(stopped)
    timing = {"train_epoch_time"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]
    ca, cb = load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(stopped / "checkpoint.pth")
    for name in ca["heads"]:
        assert torch.equal(ca["heads"][name], cb["heads"][name]), name


def test_torchrun_counts_each_val_image_once(shapes, tmp_path):
    """Two processes (gloo): every val image is counted once in the metrics, which equal those of the saved heads
    evaluated here in one process."""
    out = tmp_path / "torchrun"
    run_cmd(torchrun("eval_segmentation.py", "--data_path", shapes, "--output_dir", out, "--epochs", 1, "--lrs", 1e-3,
                     1e-2, *TINY), timeout=300)
    record = read_log(out)[-1]
    args = parse(es, "--data_path", shapes, *TINY)
    args.device = torch.device("cpu")
    utils.fix_random_seeds(0)  # the run's random backbone
    backbone = es.FrozenBackbone(args)
    _, val, classes = segmentation_data.build_datasets(str(shapes), 32, 32, 11, 255, False, 0)
    heads = es.SegmentationHeads(2, backbone.channels, 11)
    heads.load_state_dict(load_checkpoint(out / "checkpoint.pth")["heads"])
    stats = es.validate(heads, torch.utils.data.DataLoader(val, batch_size=3), backbone, args, 11)
    for name, s in zip(("lr0.001", "lr0.01"), stats):
        assert record[f"test_mIoU_{name}"] == pytest.approx(s["mIoU"], abs=1e-9)
        assert record[f"test_aAcc_{name}"] == pytest.approx(s["aAcc"], abs=1e-9)


@pytest.mark.parametrize("arch,n_last_blocks,grid", [("vit_tiny", 4, "2x2"), ("resnet18", 1, "2x2"),
                                                     ("vit_tiny_patch16_224", 4, "4x4")])
def test_any_backbone_with_a_patch_grid(shapes, tmp_path, capsys, arch, n_last_blocks, grid):
    size = 64 if arch != "vit_tiny" else 32
    flags = [*TINY, "--arch", arch, "--n_last_blocks", n_last_blocks, "--resize_size", size, "--crop_size", size]
    run("--data_path", shapes, "--output_dir", tmp_path, "--epochs", 1, *flags)
    assert f"on a {grid} grid for {size} px crops" in capsys.readouterr().out
    assert np.isfinite(read_log(tmp_path)[0]["test_mIoU"])


def test_patch_features_of_the_last_layers_are_the_normalised_tokens():
    model = backbones.build_eval_model("vit_tiny", 16, "", None, torch.device("cpu"))
    images = torch.randn(2, 3, 32, 48)
    layers = backbones.patch_features(model, images, "vit_tiny", 4)
    tokens = model.get_intermediate_layers(images, 4)
    assert len(layers) == 4 and layers[0].shape == (2, 2, 3, 192)
    for x, t in zip(layers, tokens):
        assert torch.equal(x.reshape(2, 6, 192), t[:, 1:])
    assert torch.allclose(backbones.patch_features(model, images, "vit_tiny")[0], layers[-1], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear message each
# ----------------------------------------------------------------------------------------------------
def broken_copy(shapes, dst):
    shutil.copytree(shapes, dst)
    return dst


def test_bad_pairs_end_in_one_line(shapes, tmp_path):
    # a mask of another size than its image
    wrong_size = broken_copy(shapes, tmp_path / "size")
    mask = wrong_size / "train" / "masks" / "circle_00001.png"
    Image.open(mask).resize((16, 16), Image.NEAREST).save(mask)
    proc = run_cmd(script("eval_segmentation.py", "--data_path", wrong_size, "--output_dir", tmp_path / "o1", *TINY),
                   check=False)
    assert_one_error_line(proc, f"the mask {mask} is 16x16 px but its image "
                                f"{wrong_size / 'train' / 'images' / 'circle_00001.png'} is 32x32")
    # a class index above --num_classes
    with pytest.raises(utils.UserError, match=r"holds the class index 10, outside 0..9 \(--num_classes 10\) and not "
                                              r"the ignore value 255: raise --num_classes"):
        run("--data_path", shapes, "--output_dir", tmp_path / "o2", *TINY, "--num_classes", 10)
    # an image without a mask
    no_mask = broken_copy(shapes, tmp_path / "missing")
    os.remove(no_mask / "val" / "masks" / "star_00000.png")
    with pytest.raises(utils.UserError, match=r"1 of the 10 images in .*val/images have no mask of the same name in "
                                              r".*val/masks, e.g. .*star_00000.png"):
        run("--data_path", no_mask, "--output_dir", tmp_path / "o3", *TINY)
    # an unreadable mask
    corrupt = broken_copy(shapes, tmp_path / "corrupt")
    (corrupt / "train" / "masks" / "ring_00000.png").write_bytes(b"not a png")
    with pytest.raises(utils.UserError, match=r"cannot read the mask .*ring_00000.png"):
        run("--data_path", corrupt, "--output_dir", tmp_path / "o4", *TINY)
    # a folder of another layout
    with pytest.raises(utils.UserError, match="holds neither train/images"):
        run("--data_path", tmp_path / "o1", "--output_dir", tmp_path / "o5", *TINY)


def test_bad_backbones_and_flags_end_in_one_line(shapes, tmp_path):
    # a backbone without a patch grid: stopped before any training
    with pytest.raises(utils.UserError, match="regnet_x_400mf: cannot find the last feature map"):
        run("--data_path", shapes, "--output_dir", tmp_path / "a", *TINY, "--arch", "regnet_x_400mf")
    with pytest.raises(utils.UserError, match="resnet18 gives the features of its last layer only"):
        run("--data_path", shapes, "--output_dir", tmp_path / "b", *TINY, "--arch", "resnet18", "--n_last_blocks", 4)
    with pytest.raises(utils.UserError, match="--ignore_index 3 is one of the 11 classes"):
        run("--data_path", shapes, "--output_dir", tmp_path / "c", *TINY, "--ignore_index", 3)
    with pytest.raises(utils.UserError, match="give --num_classes"):
        run("--data_path", shapes, "--output_dir", tmp_path / "d", *[f for f in TINY if f not in ("--num_classes", 11)])
    proc = run_cmd([sys.executable, str(REPO_ROOT / "eval_segmentation.py"), "--data_path", shapes, "--lrs", 0,
                    "--output_dir", tmp_path / "e"], check=False)
    assert_one_error_line(proc, "learning rates must be positive")
    assert re.search("error: learning rates must be positive, got \\[0.0\\]", proc.stderr)


def test_submitit_takes_the_script_and_checks_its_flags():
    import run_with_submitit
    own, args = run_with_submitit.parse_args(["--script", "eval_segmentation.py", "--data_path", "synthetic",
                                              "--n_last_blocks", "4", "--lrs", "1e-3", "1e-2"])
    assert own.script == "eval_segmentation.py" and args.n_last_blocks == 4 and args.lrs == [1e-3, 1e-2]
    with pytest.raises(utils.UserError, match="--n_last_blocks must be at least 1"):
        run_with_submitit.parse_args(["--script", "eval_segmentation.py", "--n_last_blocks", "0"])
