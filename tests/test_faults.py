"""Fault injection, for real: kill -9 at several moments, a full disk, a killed rank, ranks that disagree, bad
images of every kind, a pickle payload given to every script that reads weights, non-finite steps."""
import os
import random
import resource
import shutil
import signal
import subprocess
import time

import pytest
import torch

import eval_knn
import eval_linear
import main_dino
import main_distill
import utils
import visualize_attention
from conftest import (DINO_FAST, PicklePayload, after_first_epoch, assert_one_error_line, assert_same_dino_run,
                      child_env, load_checkpoint, main_dino as main_dino_cmd, make_subset, malicious_checkpoint,
                      noise_image, parse, pid_of_rank, read_log, reference_flags, run_cmd, script, split_folder,
                      torchrun, with_flags)


# ----------------------------------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------------------------------
def test_repeated_kill9_at_several_moments(cifar_40, dino_reference, tmp_path):
    """kill -9 three times: just after the first epoch's checkpoint, as a checkpoint write starts, and at a
    random moment of training. Every checkpoint left behind loads, and the run, started again each time (the
    last time in this process), ends with every epoch logged once and the same weights as a run never killed."""
    killed = tmp_path / "killed"
    # a mid-epoch checkpoint after global iterations 6 and 13 (epoch 1's batch 4), data-loader workers
    cmd = main_dino_cmd(*reference_flags(cifar_40, killed, "--num_workers", 2, "--saveckp_every_iters", 7))
    rng = random.Random(0)

    def after_first_epoch_checkpoint(proc, output):
        # log.txt is written right after the epoch's checkpoint; the next checkpoint comes 4 iterations later
        while proc.poll() is None and not (killed / "log.txt").exists():
            time.sleep(0.002)

    def as_a_checkpoint_write_starts(proc, output):
        while proc.poll() is None and not any(p.name.startswith(".checkpoint.pth.tmp") for p in killed.glob(".*")):
            time.sleep(0.002)

    def at_a_random_moment(proc, output):
        while proc.poll() is None and "Epoch: [" not in output.read_text():  # training has started
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))  # within the next iterations, well before the last one

    for attempt, wait in enumerate((after_first_epoch_checkpoint, as_a_checkpoint_write_starts, at_a_random_moment)):
        output = tmp_path / f"attempt{attempt}.txt"
        with open(output, "w") as f:
            proc = subprocess.Popen(cmd, env=child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(proc, output)
        finally:
            alive = proc.poll() is None
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert alive, f"attempt {attempt} ended before it could be killed:\n{output.read_text()[-3000:]}"
        ckpt = load_checkpoint(killed / "checkpoint.pth")  # never unloadable
        if attempt == 0:
            assert ckpt["epoch"] == 1 and "position" not in ckpt, "killed after the epoch's checkpoint"
        epochs = [r["epoch"] for r in read_log(killed)]
        assert epochs == sorted(set(epochs)), f"duplicate or unordered epochs in log.txt: {epochs}"

    main_dino.train_dino(parse(main_dino, *reference_flags(cifar_40, killed, "--saveckp_every_iters", 7)))
    assert_same_dino_run(dino_reference[0], killed)
    assert not list(killed.glob(".checkpoint.pth.tmp*")), "temporary files of killed writes are cleaned up"


# ----------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------
def test_full_disk_keeps_previous_checkpoint_and_says_so(cifar_40, dino_reference, tmp_path):
    """The reference run after its first epoch, continued on a full disk: it stops with one message and the
    epoch's checkpoint intact; with space again, the run ends with the reference's weights."""
    out = after_first_epoch(dino_reference[0], tmp_path / "run")
    cmd = main_dino_cmd(*reference_flags(cifar_40, out, "--saveckp_freq", 1))
    good = (out / "checkpoint.pth").read_bytes()

    def small_file_limit():  # files larger than half a checkpoint cannot be written (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, len(good) // 2))
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, preexec_fn=small_file_limit,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "could not write checkpoint" in proc.stderr and "The previous checkpoint, if any, is intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == good
    assert not list(out.glob(".checkpoint.pth.tmp*"))
    # With space again (here in this process), the run finishes: resumed from the epoch's checkpoint, it ends as
    # the run never stopped.
    main_dino.train_dino(parse(main_dino, *reference_flags(cifar_40, out, "--saveckp_freq", 1)))
    assert_same_dino_run(dino_reference[0], out)


# ----------------------------------------------------------------------------------------------------
# Distributed faults
# ----------------------------------------------------------------------------------------------------
def test_killed_rank_does_not_hang_the_other(cifar_40, tmp_path):
    """2 gloo processes under torchrun; rank 1 is killed: the other does not wait for it until a timeout,
    and the failure names the rank."""
    cmd = torchrun("main_dino.py", "--data_path", cifar_40, "--output_dir", tmp_path / "run", "--epochs", 5,
                   "--dist_timeout", 2, *DINO_FAST)
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Epoch: [0/5]  [1/5]" in line:
                break
        killed_at = time.time()
        os.kill(pid_of_rank(proc.pid, 1), signal.SIGKILL)
        lines += proc.stdout.readlines()
        proc.wait(timeout=150)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert proc.returncode != 0
    assert elapsed < 150, f"the surviving rank waited {elapsed:.0f} s"
    assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]


def test_ranks_with_different_flags_stop_at_startup(cifar_40, tmp_path):
    """Two processes started by hand (as on two nodes) with different --lr: both stop with one message."""
    port = str(29500 + random.Random().randrange(1000))
    procs = []
    for rank, lr in ((0, "0.0005"), (1, "0.001")):
        procs.append(subprocess.Popen(
            main_dino_cmd("--data_path", cifar_40, "--output_dir", tmp_path / "run", "--epochs", 1, "--lr", lr,
                          *DINO_FAST),
            env=child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 2, err[-2000:]
        assert "the processes disagree on their flags (lr: rank 0='0.0005', rank 1='0.001')" in err
        assert "Traceback" not in err
    assert "Starting DINO training" not in results[0][0]


# ----------------------------------------------------------------------------------------------------
# Bad images
# ----------------------------------------------------------------------------------------------------
def _bad_images_dataset(cifar10_root, dst):
    """20 CIFAR images (2 per class) plus files of every odd kind; returns the paths that cannot be read."""
    import numpy as np
    from PIL import Image
    make_subset(cifar10_root / "train", dst, per_class=2)
    cls = sorted(p for p in dst.iterdir() if p.is_dir())
    good = next(cls[0].iterdir()).read_bytes()
    unreadable = {
        "truncated.jpg": good[: len(good) // 3],
        "empty.jpg": b"",
        "not_an_image.jpg": b"this is not an image\n" * 20,
        "unsupported.png": b"%PDF-1.4\n" + os.urandom(200),  # another format under an image extension
    }
    for i, (name, payload) in enumerate(unreadable.items()):
        (cls[i] / name).write_bytes(payload)
    img = noise_image((40, 36))
    img.convert("L").save(cls[4] / "grayscale.png")
    img.convert("P").save(cls[5] / "palette.png")
    img.convert("RGBA").save(cls[6] / "rgba.png")
    img.convert("CMYK").save(cls[7] / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 36, dtype=np.uint16).reshape(36, 40) * 40)).save(cls[8] / "sixteen_bit.png")
    img.resize((8, 6)).save(cls[9] / "smaller_than_the_crop.png")
    return [cls[i] / name for i, name in enumerate(unreadable)]


def test_bad_images_of_every_kind_training_completes_and_names_them(cifar10_root, tmp_path):
    """Unreadable files are skipped, named once each (by the data-loader workers that met them) and counted;
    images of every other mode and size train."""
    unreadable = _bad_images_dataset(cifar10_root, tmp_path / "data")
    out = tmp_path / "run"
    # 30 images, batch 15: every image is drawn in the epoch (no drop_last loss)
    proc = run_cmd(main_dino_cmd("--data_path", tmp_path / "data", "--output_dir", out, "--epochs", 1,
                                 "--max_bad_images_fraction", 0.2,
                                 *with_flags(DINO_FAST, batch_size_per_gpu=15, num_workers=2)))
    for path in unreadable:
        assert proc.stdout.count(f"skipped unreadable image {path}") == 1, (path, proc.stdout[-3000:])
    assert proc.stdout.count("skipped unreadable image") == len(unreadable)
    assert read_log(out)[0]["train_bad_images"] == len(unreadable)


# ----------------------------------------------------------------------------------------------------
# A pickle payload, given to every script that reads weights
# ----------------------------------------------------------------------------------------------------
# checkpointing.load_checkpoint is the one place that refuses (tests/test_utils.py); here each script's way to
# it, in this process, and the message of one script from the command line.
VIT = ["--arch", "vit_tiny", "--patch_size", 8]


def _entry_point(where, evil, tmp_path, cifar_40):
    """The main function of the script that reads `evil` at `where`, and its parsed flags."""
    split = split_folder(cifar_40, tmp_path / "split")
    if where == "main_dino_resume":
        (tmp_path / "run").mkdir()
        shutil.copy(evil, tmp_path / "run" / "checkpoint.pth")
        return main_dino.train_dino, parse(main_dino, "--data_path", cifar_40, "--output_dir", tmp_path / "run",
                                           "--epochs", 1, *DINO_FAST)
    if where == "main_distill_teacher":
        return main_distill.train_distill, parse(
            main_distill, "--data_path", cifar_40, "--output_dir", tmp_path / "run", "--epochs", 1,
            "--teacher_arch", "vit_tiny", "--teacher_patch_size", 8, "--teacher_weights", evil, *DINO_FAST,
            "--mask_patch_size", 8)  # 32 px mask cells would tile a 32 px crop with 1 cell: no patch masked
    if where == "eval_knn":
        return eval_knn.eval_knn, parse(eval_knn, *VIT, "--pretrained_weights", evil, "--data_path", split,
                                        "--num_workers", 0)
    if where == "eval_linear":
        return eval_linear.eval_linear, parse(eval_linear, *VIT, "--pretrained_weights", evil, "--data_path", split,
                                              "--output_dir", tmp_path / "lin", "--num_workers", 0, "--epochs", 1)
    return visualize_attention.visualize_attention, parse(visualize_attention, *VIT, "--pretrained_weights", evil,
                                                          "--output_dir", tmp_path / "att")


@pytest.mark.parametrize("where", ["main_dino_resume", "main_distill_teacher", "eval_knn", "eval_linear",
                                   "visualize_attention"])
def test_pickle_payload_refused_everywhere(cifar_40, tmp_path, where):
    marker = tmp_path / "PWNED"
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    main, args = _entry_point(where, evil, tmp_path, cifar_40)
    with pytest.raises(utils.UserError, match="refusing to load"):
        main(args)
    assert not marker.exists(), "the payload ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_refused_from_the_command_line_in_one_line(tmp_path):
    """A plain pickle (not even a torch.save file) given to eval_knn.py: exit code 2, one line, and nothing ran."""
    import pickle
    marker = tmp_path / "PAYLOAD_RAN"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"teacher": PicklePayload(marker)}, f)
    proc = run_cmd(script("eval_knn.py", "--arch", "vit_tiny", "--data_path", "synthetic", "--pretrained_weights",
                          tmp_path / "evil.pth"), cwd=tmp_path, check=False, timeout=120)
    assert not marker.exists(), "the payload ran"
    assert_one_error_line(proc, "refusing to load")


# ----------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------
class _NaNGradient(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose step breaks the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def nan_at(monkeypatch):
    """Make the DINO loss NaN at the given (0-based) calls, or with `gradient_only` its gradients alone (the
    loss stays finite): a fault injected from outside."""
    from losses.dino import DINOLoss

    def inject(*iterations, gradient_only=False):
        forward, calls = DINOLoss.forward, []

        def faulty(self, *a, **k):
            loss = forward(self, *a, **k)
            calls.append(None)
            if len(calls) - 1 not in iterations:
                return loss
            return _NaNGradient.apply(loss) if gradient_only else loss * float("nan")
        monkeypatch.setattr(DINOLoss, "forward", faulty)
    return inject


def _train(cifar_40, out, *flags):
    """2 epochs of 5 steps, in this process."""
    main_dino.train_dino(parse(main_dino, "--data_path", cifar_40, "--output_dir", out, "--epochs", 2,
                               *with_flags(DINO_FAST, batch_size_per_gpu=8), *flags))


def test_nonfinite_steps_skipped_up_to_the_limit(cifar_40, tmp_path, nan_at, capsys):
    nan_at(3, 7)
    out = tmp_path / "run"
    _train(cifar_40, out, "--skip_nonfinite", 2)
    stdout = capsys.readouterr().out
    assert "non-finite loss or gradients at epoch 0, iteration 3: step skipped (1 of at most 2)" in stdout
    assert "at epoch 1, iteration 7: step skipped (2 of at most 2)" in stdout
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert all(r["train_loss"] == r["train_loss"] for r in read_log(out)), "NaN reached the log"


def test_nonfinite_step_beyond_the_limit_stops_and_keeps_checkpoint(cifar_40, tmp_path, nan_at):
    nan_at(2, 6, 7)
    out = tmp_path / "run"
    with pytest.raises(utils.UserError, match=r"after 1 skipped step\(s\) \(--skip_nonfinite\): stopping training"):
        _train(cifar_40, out, "--skip_nonfinite", 1)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # the good epoch-0 checkpoint, not a broken state


@pytest.mark.parametrize("bad_step,flags,where", [
    (9, (), "after epoch 1"),  # the last step of epoch 1 (5 per epoch), just before its checkpoint
    (7, ("--saveckp_every_iters", 2), "inside epoch 1"),  # just before a mid-epoch checkpoint (after step 7)
])
def test_nonfinite_gradient_with_finite_loss_is_never_checkpointed(cifar_40, tmp_path, nan_at, bad_step, flags,
                                                                   where):
    """A step with a finite loss and NaN gradients breaks the weights just before a checkpoint: the run stops
    without writing it, and the last good checkpoint stays (only the loss is checked at every step)."""
    nan_at(bad_step, gradient_only=True)
    out = tmp_path / "run"
    with pytest.raises(utils.UserError, match=rf"weights are not finite {where} .*although the loss was.*"
                                              r"untouched and the run resumes from it"):
        _train(cifar_40, out, *flags)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    # the last good one: after epoch 0, or inside epoch 1 after its first step (iteration 5)
    assert ckpt["epoch"] == 1 and ckpt.get("position", {}).get("batches") == (1 if flags else None)
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_nonfinite_without_skipping_stops_at_once(cifar_40, tmp_path, nan_at):
    nan_at(2)
    out = tmp_path / "run"
    with pytest.raises(utils.UserError, match="Loss is nan at epoch 0, iteration 2.*--skip_nonfinite"):
        _train(cifar_40, out)
    assert not (out / "checkpoint.pth").exists()
