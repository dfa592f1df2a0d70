"""eval_linear.py: the official linear probe, several heads in one pass, cached features, resume, --evaluate,
torchrun accounting, unreadable images, flag errors, and the exact mid-epoch resume after a signal or a crash. Tiny: vit_tiny on 32-px images, a few dozen of them."""
import math
import os
import random
import re
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones
import data
import eval_linear
import utils
from conftest import (REPO_ROOT, assert_one_error_line, assert_same_run, load_checkpoint, make_subset, parse,
                      read_log, run_cmd, stop_when, torchrun)

# 3 colours x (8 train, 5 val) images of 32 px: random vit_tiny features separate them perfectly.
TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--resize_size", "32", "--crop_size", "32",
        "--batch_size_per_gpu", "8", "--num_workers", "0", "--print_freq", "100"]
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
# val/blue/00.png is red: the best any classifier can do is 14/15, and it is index 0 of val, the image a
# DistributedSampler repeats to pad 15 images over 2 processes (counting it twice would give 14/16).
BEST_POSSIBLE = 100.0 * 14 / 15


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 5)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                colour = COLOURS["red"] if (split, name, i) == ("val", "blue", 0) else rgb
                pixels = np.clip(np.array(colour) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.png")
    return root


def run(*argv):
    """eval_linear in this process (no interpreter start-up)."""
    return eval_linear.eval_linear(parse(eval_linear, *argv))


@pytest.fixture(scope="module")
def multi_head_run(colours, tmp_path_factory):
    """4 heads (a tiny and a good lr, with and without avgpool) trained in one pass on cached features."""
    out = tmp_path_factory.mktemp("multi_head")
    result = run("--data_path", colours, "--output_dir", out, "--epochs", 2, "--lrs", 1e-6, 0.1,
                 "--avgpool_patchtokens", "both", "--cache_features", *TINY)
    return out, result


# ----------------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------------
def test_features_have_the_official_layout():
    torch.manual_seed(0)
    model, _ = backbones.build_backbone("vit_tiny", 16)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # n_last_blocks=1 with avgpool (ViT-B): the official lines, verbatim
        intermediate_output = model.get_intermediate_layers(x, 1)
        output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
        output = torch.cat((output.unsqueeze(-1), torch.mean(intermediate_output[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
        official = output.reshape(output.shape[0], -1)
        heads = backbones.LinearHeads([False, True], 10, model.embed_dim, 1, vit=True)
        features = backbones.linear_features(model, x, 1, avgpool=True, vit=True)
        assert torch.equal(heads.head_input(features, True), official)
        assert official.shape == (2, 2 * 192)

        # n_last_blocks=4 without avgpool (ViT-S): the CLS tokens of the last 4 blocks, concatenated
        intermediate_output = model.get_intermediate_layers(x, 4)
        official = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
        heads = backbones.LinearHeads([False, True], 10, model.embed_dim, 4, vit=True)
        features = backbones.linear_features(model, x, 4, avgpool=True, vit=True)
        assert torch.equal(heads.head_input(features, False), official)
        assert torch.equal(backbones.linear_features(model, x, 4, avgpool=False, vit=True), official)
        # with avgpool (the official line fails for n > 1): the same channel-wise interleaving
        mean = intermediate_output[-1][:, 1:].mean(dim=1)
        interleaved = torch.stack([t[:, 0] for t in intermediate_output] + [mean], dim=-1).reshape(2, -1)
        assert torch.equal(heads.head_input(features, True), interleaved)
        assert [h.linear.in_features for h in heads.heads] == [4 * 192, 5 * 192]
        assert [o.shape for o in heads(features)] == [(2, 10), (2, 10)]


def test_linear_classifier_is_the_official_one():
    torch.manual_seed(0)
    head = backbones.LinearClassifier(400, num_labels=1000)
    assert set(head.state_dict()) == {"linear.weight", "linear.bias"}
    assert abs(head.linear.weight.std().item() - 0.01) < 2e-4 and abs(head.linear.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(head.linear.bias) == 0
    x = torch.randn(3, 4, 100)  # flattened
    assert torch.allclose(head(x), x.reshape(3, 400) @ head.linear.weight.t())


def test_heads_learn_separable_features_and_a_tiny_lr_learns_less():
    """Train two heads side by side on cached, linearly separable tensors (3 well-apart blobs)."""
    gen = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 16, generator=gen)

    def blobs(n):
        labels = torch.arange(3).repeat(n)
        return centres[labels] + 0.3 * torch.randn(3 * n, 16, generator=gen), labels

    train_x, train_y = blobs(20)
    val_x, val_y = blobs(10)
    torch.manual_seed(0)
    heads = backbones.LinearHeads([False, False], 3, 16, n_last_blocks=1, vit=False)
    optimizer = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads.heads, (1e-6, 0.5))],
                                momentum=0.9)
    readable = torch.ones(60, dtype=torch.bool)
    sampler = torch.utils.data.DistributedSampler(range(60), num_replicas=1, rank=0, shuffle=True, seed=0)
    first = None
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = eval_linear.cached_batches(train_x, train_y, readable, list(sampler), 16)
        stats = eval_linear.train_heads(heads, optimizer, batches, 4, ["tiny", "good"], torch.device("cpu"), epoch)
        first = first or stats
    val = eval_linear.validate(heads, val_x, val_y, torch.ones(30, dtype=torch.bool))
    assert val[1]["acc1"] == 100.0
    assert stats["good"]["loss"] < 0.05 < first["good"]["loss"]
    assert val[0]["loss"] > 0.5 > 0.05 > val[1]["loss"]  # the tiny lr barely moved from ln(3)
    assert eval_linear.best_index(val) == 1
    assert "acc5" not in val[0]  # fewer than 5 labels: top-1 only, as the official script


def test_unreadable_rows_are_masked_out_of_loss_and_accuracy():
    output = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    readable = torch.tensor([True, True, False])
    expected = F.cross_entropy(output[:2], target[:2])
    assert torch.allclose(eval_linear.masked_cross_entropy(output, target, readable), expected)
    assert eval_linear.masked_cross_entropy(output, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    heads = backbones.LinearHeads([False], 2, 2, 1, vit=False)
    with torch.no_grad():
        heads.heads[0].linear.weight.copy_(torch.eye(2))
        heads.heads[0].linear.bias.zero_()
    stats = eval_linear.validate(heads, output, target, readable)[0]
    assert stats["acc1"] == 100.0  # the misclassified row is unreadable: not counted
    assert stats["loss"] == pytest.approx(expected.item())


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------
def test_several_lrs_and_both_avgpools_in_one_pass(multi_head_run, capsys):
    out, result = multi_head_run
    log = read_log(out)
    names = ["lr1e-06", "lr1e-06_avgpool", "lr0.1", "lr0.1_avgpool"]
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        for name in names:
            assert {f"test_acc1_{name}", f"test_loss_{name}", f"train_loss_{name}", f"train_lr_{name}"} <= set(r)
        assert r["test_num_images"] == 15
        assert r["test_best_head"] in ("lr0.1", "lr0.1_avgpool")
        assert r["test_acc1"] == max(r[f"test_acc1_{n}"] for n in names)
    last = log[-1]
    for good, tiny in (("lr0.1", "lr1e-06"), ("lr0.1_avgpool", "lr1e-06_avgpool")):
        assert last[f"test_acc1_{good}"] == pytest.approx(BEST_POSSIBLE)
        assert last[f"test_loss_{tiny}"] > 2 * last[f"test_loss_{good}"]
        assert last[f"train_loss_{tiny}"] > 2 * last[f"train_loss_{good}"]
        # each head's own lr, linearly scaled (batch 8 / 256) and on the cosine (epoch 1 of 2: half)
        assert last[f"train_lr_{good}"] == pytest.approx(0.1 * 8 / 256 * 0.5)
        assert last[f"train_lr_{tiny}"] == pytest.approx(1e-6 * 8 / 256 * 0.5)
    assert result["best_acc"] == pytest.approx(BEST_POSSIBLE)
    assert result["best_head"]["lr"] == 0.1

    checkpoint = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["best_acc"] == pytest.approx(BEST_POSSIBLE)
    # the best head in the official format; 3 outputs (the dataset's classes, not --num_labels 1000)
    assert set(checkpoint["state_dict"]) == {"module.linear.weight", "module.linear.bias"}
    dim = 192 * (4 + int(checkpoint["best_head"]["avgpool"]))
    assert checkpoint["state_dict"]["module.linear.weight"].shape == (3, dim)
    assert len([k for k in checkpoint["heads"] if k.endswith("linear.weight")]) == 4
    assert {"optimizer", "scheduler", "run_config", "log_history"} <= set(checkpoint)


def test_one_backbone_forward_per_batch_for_all_heads(colours, tmp_path, monkeypatch, capsys):
    calls = []
    original = backbones.linear_features

    def counting(model, images, *args, **kwargs):
        calls.append(images.shape[0])
        return original(model, images, *args, **kwargs)

    monkeypatch.setattr(backbones, "linear_features", counting)
    run("--data_path", colours, "--output_dir", tmp_path, "--epochs", 2, "--lrs", 0.01, 0.1,
        "--avgpool_patchtokens", "both", *TINY)
    # val once (2 batches: 8 + 7 images), then 3 train batches of 8 per epoch, whatever the number of heads
    assert calls == [8, 7] + [8, 8, 8] * 2
    stdout = capsys.readouterr().out
    assert "Note: --num_labels 1000 but" in stdout and "3 classes" in stdout
    assert "Max accuracy so far" in stdout
    assert "Training of the supervised linear classifier on frozen features completed.\nTop-1 test accuracy:" in stdout


def test_cached_features_train_exactly_like_recomputed_ones(colours, tmp_path, capsys):
    common = ["--data_path", colours, "--epochs", 3, "--lrs", 0.001, 0.03, "--avgpool_patchtokens", "both", *TINY]
    run(*common, "--output_dir", tmp_path / "cached", "--cache_features")
    stdout = capsys.readouterr().out
    assert "train features of 24 images extracted in" in stdout and "Epoch 2 trained in" in stdout
    run(*common, "--output_dir", tmp_path / "recomputed", "--train_augmentation", "false")
    cached, recomputed = read_log(tmp_path / "cached"), read_log(tmp_path / "recomputed")
    for a, b in zip(cached, recomputed):
        for key in a:
            if key.startswith("test_acc") or key in ("test_best_head", "test_num_images", "epoch"):
                assert a[key] == b[key], key
            elif "loss" in key:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a = torch.load(tmp_path / "cached" / "checkpoint.pth.tar", weights_only=True)["heads"]
    b = torch.load(tmp_path / "recomputed" / "checkpoint.pth.tar", weights_only=True)["heads"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_cpu_bf16_backbone_learns_like_fp32(colours, tmp_path, capsys):
    """--amp_dtype bf16 runs the frozen backbone under bf16 autocast on CPU; the features stay fp32 for the
    heads, and the heads reach the accuracy of the fp32 run."""
    common = ["--data_path", colours, "--epochs", 2, "--lrs", 0.1, "--cache_features", *TINY]
    run(*common, "--output_dir", tmp_path / "fp32")
    assert "Backbone precision: fp32 (CPU" in capsys.readouterr().out
    run(*common, "--output_dir", tmp_path / "bf16", "--amp_dtype", "bf16")
    assert "Backbone precision: bf16 autocast on CPU" in capsys.readouterr().out
    fp32, bf16 = read_log(tmp_path / "fp32")[-1], read_log(tmp_path / "bf16")[-1]
    assert bf16["test_acc1"] == fp32["test_acc1"] == pytest.approx(BEST_POSSIBLE)


def test_resume_continues_from_the_checkpoint(colours, tmp_path, capsys):
    common = ["--data_path", colours, "--output_dir", tmp_path, "--cache_features", *TINY]
    run(*common, "--lr", 0.01, "--epochs", 2)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]
    capsys.readouterr()
    run(*common, "--lr", 0.01, "--epochs", 3)
    stdout = capsys.readouterr().out
    assert "Resuming at epoch 2" in stdout and "Epoch: [0]" not in stdout and "Epoch: [2]" in stdout
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    # the cosine now ends at the new --epochs: epoch 2 of 3 trains at a quarter of the base lr (not at 0)
    assert log[2]["train_lr"] == pytest.approx(0.01 * 8 / 256 * (1 + math.cos(math.pi * 2 / 3)) / 2)
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["epoch"] == 3
    with pytest.raises(utils.UserError, match="belongs to another run"):
        run(*common, "--lrs", 0.01, 0.1, "--epochs", 4)


def test_evaluate_saved_and_official_format_linear_weights(multi_head_run, colours, tmp_path, capsys):
    out, result = multi_head_run
    capsys.readouterr()
    # the output_dir checkpoint: its best head, on the feature it was trained with, gives the reported accuracy
    stats = run("--data_path", colours, "--output_dir", out, "--evaluate", *TINY)
    assert stats["test"]["acc1"] == pytest.approx(result["best_acc"]) and stats["num_images"] == 15
    assert f"Accuracy of the network on the 15 test images: {result['best_acc']:.1f}%" in capsys.readouterr().out

    # an official *_linearweights.pth holds only {"state_dict": {module.linear.*}}: the flags give the feature
    checkpoint = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    official = tmp_path / "dino_vittiny16_linearweights.pth"
    torch.save({"state_dict": checkpoint["state_dict"]}, official)
    avgpool = str(checkpoint["best_head"]["avgpool"])
    stats = run("--data_path", colours, "--evaluate", "--pretrained_linear", official,
                "--avgpool_patchtokens", avgpool, *TINY)
    assert stats["test"]["acc1"] == pytest.approx(result["best_acc"])
    with pytest.raises(utils.UserError, match="take .*-dim features"):
        run("--data_path", colours, "--evaluate", "--pretrained_linear", official, "--avgpool_patchtokens", avgpool,
            "--n_last_blocks", 2, *TINY)
    with pytest.raises(utils.UserError, match="--evaluate needs linear weights"):
        run("--data_path", colours, "--evaluate", "--output_dir", tmp_path, *TINY)


def test_torchrun_two_processes_count_each_val_image_once(colours, tmp_path):
    common = ["--data_path", colours, "--epochs", 3, "--lrs", 0.01, 0.1, "--cache_features", *TINY]
    # one process with batches of 8 = two processes with batches of 4 (same global batches, same scaled lr)
    run(*common, "--output_dir", tmp_path / "single")
    common[common.index("--batch_size_per_gpu") + 1] = 4
    run_cmd(torchrun("eval_linear.py", *common, "--output_dir", tmp_path / "torchrun"), env={"OMP_NUM_THREADS": "1"},
            timeout=300)
    single, two = read_log(tmp_path / "single"), read_log(tmp_path / "torchrun")
    assert len(single) == len(two) == 3
    for a, b in zip(single, two):
        # 15 val images padded to 16 over 2 processes: the repeated (mislabelled) image counts once
        assert a["test_num_images"] == b["test_num_images"] == 15
        for key in ("test_acc1_lr0.01", "test_acc1_lr0.1", "test_acc1"):
            assert a[key] == b[key], key
        for key in ("test_loss_lr0.01", "test_loss_lr0.1", "train_loss_lr0.01", "train_loss_lr0.1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert single[-1]["test_acc1"] == pytest.approx(BEST_POSSIBLE)


def test_unreadable_images_are_named_once_and_left_out(colours, tmp_path, capsys):
    data_path = tmp_path / "data"
    shutil.copytree(colours, data_path)
    for split in ("train", "val"):
        (data_path / split / "green" / "zz_broken.png").write_bytes(b"not an image")
    run("--data_path", data_path, "--output_dir", tmp_path / "out", "--epochs", 2, "--lr", 0.1, *TINY)
    stdout = capsys.readouterr().out
    for split in ("train", "val"):
        assert stdout.count(f"WARNING: unreadable {split} image left out of training and accuracy: "
                            f"{data_path / split / 'green' / 'zz_broken.png'}") == 1
    log = read_log(tmp_path / "out")
    assert [r["test_num_images"] for r in log] == [15, 15]
    assert log[-1]["test_acc1"] == pytest.approx(BEST_POSSIBLE)


def test_user_errors_end_in_one_line(colours, tmp_path):
    proc = run_cmd([sys.executable, str(REPO_ROOT / "eval_linear.py"), "--epochs", 0, "--data_path", colours,
                    "--output_dir", tmp_path], check=False)
    assert_one_error_line(proc, "--epochs must be at least 1, got 0")
    assert proc.stderr.strip() == "error: --epochs must be at least 1, got 0"
    with pytest.raises(utils.UserError, match=r"--n_last_blocks 13 is larger than the depth of vit_tiny \(12"):
        run("--data_path", colours, "--output_dir", tmp_path, "--n_last_blocks", 13, *TINY)
    (tmp_path / "no_val" / "train" / "a").mkdir(parents=True)
    with pytest.raises(utils.UserError, match="has no val/ folder"):
        run("--data_path", tmp_path / "no_val", "--output_dir", tmp_path, *TINY)
    with pytest.raises(utils.UserError, match="repeated"):
        run("--data_path", colours, "--lrs", 0.1, 0.1, *TINY)
    with pytest.raises(SystemExit):  # argparse: not a boolean nor "both"
        parse(eval_linear, "--avgpool_patchtokens", "maybe")


def test_real_cifar_subset(cifar_subset, cifar10_root, tmp_path, capsys):
    data_path = tmp_path / "cifar"
    shutil.copytree(cifar_subset, data_path / "train")
    make_subset(cifar10_root / "test", data_path / "val", per_class=4)
    common = ["--data_path", data_path, "--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "32",
              "--crop_size", "32", "--batch_size_per_gpu", "32", "--num_workers", "0", "--lrs", 0.01, 0.1]
    # the official recipe (RandomResizedCrop + flips) on real images
    run(*common, "--output_dir", tmp_path / "augmented", "--epochs", 1)
    log = read_log(tmp_path / "augmented")
    assert log[0]["test_num_images"] == 40 and 0 <= log[0]["test_acc1"] <= 100
    assert math.isfinite(log[0]["train_loss"]) and "test_acc5_lr0.1" in log[0]
    # cached features: the training loss of every head goes down epoch after epoch
    run(*common, "--output_dir", tmp_path / "cached", "--epochs", 4, "--cache_features")
    log = read_log(tmp_path / "cached")
    for name in ("lr0.01", "lr0.1"):
        losses = [r[f"train_loss_{name}"] for r in log]
        assert all(b < a for a, b in zip(losses, losses[1:])), (name, losses)


# ----------------------------------------------------------------------------------------------------
# Mid-epoch exact resume: a run stopped by a signal (or killed after a periodic mid-epoch checkpoint) and
# started again ends with the same heads and the same log as a run never stopped
# ----------------------------------------------------------------------------------------------------
# 8 heads and batches of one image: 24 iterations per epoch, each printing a progress line of ~360 bytes.
RESUME = [*TINY, "--batch_size_per_gpu", 1, "--print_freq", 1, "--epochs", 2, "--lrs", 0.001, 0.01, 0.1, 0.3,
          "--avgpool_patchtokens", "both"]
TIMING_KEYS = {"train_epoch_time"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same threads in every run of a comparison: the same bits


def script(data_path, out_dir, *flags):
    return [sys.executable, REPO_ROOT / "eval_linear.py", "--data_path", data_path, "--output_dir", out_dir,
            *RESUME, *flags]


def assert_same_linear_run(ref, resumed):
    """The same log (but timings) and bit-identical heads, best head and optimizer state."""
    a, b = assert_same_run(ref, resumed, "checkpoint.pth.tar", ("heads", "state_dict"), "momentum_buffer",
                           TIMING_KEYS)
    assert a["best_head"] == b["best_head"] and a["epoch"] == b["epoch"] == 2


def progress_batches(stdout, epoch):
    return [int(b) for b in re.findall(rf"Epoch: \[{epoch}\]\s+\[\s*(\d+)/24\]", stdout)]


@pytest.fixture(scope="module")
def cached_reference(colours, tmp_path_factory):
    """The uninterrupted --cache_features run that the interrupted ones must equal (in this process, on one
    thread as the others)."""
    out = tmp_path_factory.mktemp("cached_reference")
    run("--data_path", colours, "--output_dir", out, *RESUME, "--cache_features")
    return out


def test_eval_dataset_seeds_augmentations_per_sample(colours):
    base = data.build_dataset(str(colours / "train"))
    dataset = data.LabeledDataset(base, eval_linear.train_transform(16), seed=0)
    torch.manual_seed(1)
    first = dataset[(1, 3)][0]
    torch.manual_seed(2)
    random.seed(2)
    state = torch.get_rng_state()
    assert torch.equal(dataset[(1, 3)][0], first), "a function of (seed, epoch, index) alone"
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is left as it was"
    assert not torch.equal(dataset[(2, 3)][0], first), "another epoch, another crop"
    # without a seed, or with a plain index (eval_knn), nothing changes: the global RNG draws
    unseeded = data.LabeledDataset(base, eval_linear.train_transform(16))
    unseeded[(1, 3)]
    assert not torch.equal(torch.get_rng_state(), state)
    assert dataset[3][1] == dataset[(1, 3)][1] == base.samples[3][1]


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(colours, cached_reference, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    cmd = script(colours, stopped, "--cache_features")
    code, out = stop_when(cmd, r"Epoch: \[0\]\s+\[ 1/24\]", lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "Received SIGTERM" in out and "Traceback" not in out
    stopped_at = re.search(r"Stopped by SIGTERM at epoch 0, iteration (\d+)/24; the checkpoint \S+ holds this "
                           r"exact position: run the same command again to resume there.", out)
    assert stopped_at, out[-2000:]
    ckpt = load_checkpoint(stopped / "checkpoint.pth.tar")
    batches = ckpt["position"]["batches"]
    assert ckpt["epoch"] == 0 and int(stopped_at.group(1)) == batches and 2 <= batches < 24
    assert not (stopped / "log.txt").exists() or not (stopped / "log.txt").read_text().strip()

    with pytest.raises(utils.UserError, match="in the middle of epoch 0, before any head was validated"):
        run("--data_path", colours, "--output_dir", stopped, "--evaluate", *TINY)
    # a position inside an epoch means the same samples only with the same processes
    other = tmp_path / "other"
    shutil.copytree(stopped, other)
    ckpt["position"]["ranks"] *= 2
    torch.save(ckpt, other / "checkpoint.pth.tar")
    with pytest.raises(utils.UserError, match=r"in the middle of epoch 0 by 2 processes .* resume it with the same"):
        run("--data_path", colours, "--output_dir", other, *RESUME, "--cache_features")

    capsys.readouterr()
    run("--data_path", colours, "--output_dir", stopped, *RESUME, "--cache_features")  # again, in this process
    stdout = capsys.readouterr().out
    assert f"Resuming epoch 0 at batch {batches} of 24" in stdout
    # the consumed batches are not trained again: the epoch goes on at the next one
    assert progress_batches(stdout, 0) == list(range(batches, 24))
    assert_same_linear_run(cached_reference, stopped)


def test_augmented_images_with_workers_resume_exactly(colours, tmp_path):
    """The image path: RandomResizedCrop and flips in 2 data-loader workers, stopped by SLURM's SIGUSR2. The
    reference loads in the main process: the augmentations depend on neither the workers nor the resume."""
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run("--data_path", colours, "--output_dir", ref, *RESUME, "--num_workers", 0)
    cmd = script(colours, stopped, "--num_workers", 2)
    code, out = stop_when(cmd, r"Epoch: \[1\]\s+\[ 1/24\]", lambda p: os.killpg(p.pid, signal.SIGUSR2))
    assert code == 128 + signal.SIGUSR2, out[-3000:]
    assert re.search(r"Stopped by SIGUSR2 at epoch 1, iteration \d+/24", out) and "Traceback" not in out
    ckpt = load_checkpoint(stopped / "checkpoint.pth.tar")
    batches = ckpt["position"]["batches"]
    assert ckpt["epoch"] == 1 and 2 <= batches < 24 and len(read_log(stopped)) == 1

    proc = run_cmd(cmd, env=ONE_THREAD)
    assert f"Resuming epoch 1 at batch {batches} of 24" in proc.stdout
    assert progress_batches(proc.stdout, 1) == list(range(batches, 24))
    assert_same_linear_run(ref, stopped)


def test_kill9_after_periodic_mid_epoch_checkpoint(colours, cached_reference, tmp_path, capsys):
    """--saveckp_every_iters: a crash without any signal loses at most that many iterations."""
    killed = tmp_path / "killed"
    cmd = script(colours, killed, "--cache_features", "--saveckp_every_iters", 5)
    # every 5 iterations of the run: after global iterations 4, 9, ..., 34, i.e. epoch 1's batch 11 has been
    # checkpointed when the progress line of its iteration 10 (printed after the step) appears
    code, _ = stop_when(cmd, r"Epoch: \[1\]\s+\[10/24\]", lambda p: os.killpg(p.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL
    ckpt = load_checkpoint(killed / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 1 and ckpt["position"]["batches"] in (11, 16, 21)
    capsys.readouterr()
    run("--data_path", colours, "--output_dir", killed, *RESUME, "--cache_features", "--saveckp_every_iters", 5)
    assert f"Resuming epoch 1 at batch {ckpt['position']['batches']} of 24" in capsys.readouterr().out
    assert_same_linear_run(cached_reference, killed)
