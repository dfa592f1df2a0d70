"""Training health without labels (health.py): the signals against their definitions (entropy + KL = the DINO
loss), RankMe, feature spread, the collapse detector, and the evidence: the two collapses of the DINO paper's
ablation (no sharpening, no centring) flagged with the right kind within 2 epochs, a healthy run that does not
warn, --stop_on_collapse, --knn_eval_at_start, the curves, and main_distill.py's signals."""
import math

import pytest
import torch
import torch.nn.functional as F

import health
import main_dino
import plot_curves
import synthetic
import tracking
import utils
from conftest import parse, read_log
from losses import DINOLoss


# ----------------------------------------------------------------------------------------------------
# The signals
# ----------------------------------------------------------------------------------------------------
def pairwise_kl(student_output, teacher_probs, ncrops, student_temp):
    """Mean KL(q_t || p_s) over the official pairs (teacher view t of the 2, student view s != t), written
    out pair by pair as the official loop enumerates them."""
    s_logp = F.log_softmax(student_output / student_temp, dim=-1).chunk(ncrops)
    q = teacher_probs.chunk(2)
    kls = [F.kl_div(s_logp[v], q[iq], reduction="batchmean") for iq in range(2) for v in range(ncrops) if v != iq]
    return torch.stack(kls).mean()


@pytest.mark.parametrize("ncrops,temp", [(4, 0.04), (2, 0.07), (6, 0.1)])
def test_entropy_plus_kl_is_the_dino_loss(ncrops, temp):
    torch.manual_seed(0)
    k, b = 64, 8
    loss_fn = DINOLoss(k, ncrops, temp, temp, 0, 10)
    loss_fn.center.copy_(torch.randn(1, k) * 0.5)  # a centre that matters
    student, teacher = torch.randn(ncrops * b, k) * 3, torch.randn(2 * b, k) * 3
    center_before = loss_fn.center.clone()
    logp = health.teacher_log_probs(teacher, loss_fn.center, temp)
    loss = loss_fn(student, teacher, 0)
    assert not torch.equal(loss_fn.center, center_before)  # the loss updated the centre after we read it
    signals = health.dino_signals(logp, loss, torch.randn(2 * b, 16))
    q = torch.softmax((teacher - center_before) / temp, dim=-1)
    direct_entropy = -torch.special.xlogy(q, q).sum(-1).mean()
    direct_kl = pairwise_kl(student, q, ncrops, 0.1)
    torch.testing.assert_close(signals["teacher_entropy"], direct_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(signals["kl"], direct_kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(signals["teacher_entropy"] + direct_kl, loss, rtol=1e-5, atol=1e-4)
    assert direct_kl > 0
    torch.testing.assert_close(signals["teacher_entropy_frac"], direct_entropy / math.log(k))
    mean_q = q.mean(0)
    torch.testing.assert_close(signals["prototypes_in_use"], torch.exp(-torch.special.xlogy(mean_q, mean_q).sum()))


def test_prototypes_in_use_and_entropy_at_the_extremes():
    k = 32
    one_hot = torch.full((10, k), -1e4)
    one_hot[:, 3] = 0.
    s = health.dino_signals(torch.log_softmax(one_hot, -1), torch.tensor(0.))
    assert float(s["prototypes_in_use"]) == pytest.approx(1.0, abs=1e-4)
    assert float(s["teacher_entropy"]) == pytest.approx(0.0, abs=1e-4)
    uniform = torch.log_softmax(torch.zeros(10, k), -1)
    s = health.dino_signals(uniform, torch.tensor(math.log(k)))
    assert float(s["prototypes_in_use"]) == pytest.approx(k, rel=1e-4)
    assert float(s["teacher_entropy_frac"]) == pytest.approx(1.0, abs=1e-5)
    assert float(s["kl"]) == pytest.approx(0.0, abs=1e-4)


def test_feature_spread_and_rankme():
    torch.manual_seed(0)
    spread = float(health.feature_spread(torch.randn(512, 192)))
    assert 0.95 < spread <= 1.0  # isotropic features: about 1
    assert float(health.feature_spread(torch.randn(1, 192).expand(64, 192) * 5)) < 1e-3  # one point: 0
    assert float(health.feature_spread(torch.randn(1, 192) + 0.01 * torch.randn(64, 192))) < 0.05
    assert health.rankme(torch.eye(20)) == pytest.approx(20, rel=1e-3)
    assert health.rankme(torch.randn(100, 1) @ torch.randn(1, 50)) < 1.01
    assert 30 < health.rankme(torch.randn(256, 64)) <= 64
    assert math.isnan(health.rankme(torch.full((8, 4), float("nan"))))  # a broken network: NaN, not an SVD error


def test_detector_needs_the_collapse_held_for_a_window_after_the_warm_up():
    uniform = {"teacher_entropy_frac": 0.99, "kl": 0.01, "prototypes_in_use": 200., "feature_spread": 0.5}
    single = {"teacher_entropy_frac": 0.01, "kl": 0.01, "prototypes_in_use": 1.0, "feature_spread": 0.5}
    point = {"teacher_entropy_frac": 0.5, "kl": 0.5, "prototypes_in_use": 30., "feature_spread": 0.01}
    healthy = {"teacher_entropy_frac": 0.5, "kl": 0.5, "prototypes_in_use": 30., "feature_spread": 0.8}
    d = health.CollapseDetector(warmup=10, window=5)
    assert all(d.observe(it, uniform) is None for it in range(10 + 5))  # warm-up, then 5 iterations held
    warning = d.observe(15, {k: torch.tensor(v) for k, v in uniform.items()})
    assert warning.startswith("WARNING: collapse (uniform) at iteration 15") and "--teacher_temp" in warning
    assert d.collapsed == "uniform" and d.observe(16, uniform) is None  # one line only
    d = health.CollapseDetector(warmup=0, window=3)
    assert [d.observe(it, single if it % 3 else healthy) for it in range(12)] == [None] * 12  # transient
    assert d.observe(12, single) is None and d.observe(15, single).startswith("WARNING: collapse (single-prototype)")
    d = health.CollapseDetector(warmup=0, window=0)
    assert "single-prototype" in d.observe(0, point)
    assert health.CollapseDetector(warmup=0, window=0).observe(0, healthy) is None


# ----------------------------------------------------------------------------------------------------
# Evidence: deliberate collapses and a healthy run (20 steps per epoch, 2 epochs)
# ----------------------------------------------------------------------------------------------------
# Small but fast to move: a high learning rate and teacher momentum 0.9, so that the ablations collapse
# within 2 epochs; the detector keeps its defaults (warm-up: the first epoch; window: half an epoch).
# --use_bn_in_head true, as in the quickstart: on the plain generated shapes a head without BatchNorm collapses
# even with the official centring and sharpening (docs/training.md), so the healthy run would not be healthy.
HEALTH_FAST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
               "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "16", "--warmup_epochs", "0",
               "--freeze_last_layer", "0", "--lr", "0.05", "--momentum_teacher", "0.9", "--epochs", "2",
               "--print_freq", "100", "--log_freq", "1", "--saveckp_freq", "0", "--num_workers", "0",
               "--health_probe_size", "64", "--use_fp16", "false", "--use_bn_in_head", "true"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated shapes at 32 px: 320 training images (20 steps of 16), 40 for validation."""
    root = synthetic.make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), num_train_per_class=32,
                                            num_val_per_class=4, image_size=32)
    return root


def run_dino(data_root, out, *extra):
    main_dino.train_dino(parse(main_dino, "--data_path", f"{data_root}/train", "--output_dir", out, *HEALTH_FAST,
                               *extra))


@pytest.fixture(scope="module")
def healthy_run(shapes, tmp_path_factory):
    """The healthy run (official centring and sharpening), with the k-NN before training."""
    import io
    from contextlib import redirect_stdout
    out = tmp_path_factory.mktemp("healthy") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        run_dino(shapes, out, "--knn_data_path", shapes, "--knn_eval_at_start", "true")
    return out, buf.getvalue()


def test_healthy_run_logs_the_signals_and_does_not_warn(healthy_run):
    out, stdout = healthy_run
    assert "WARNING: collapse" not in stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [-1, 0, 1]
    start = log[0]
    assert {"knn_top1", "knn_top5", "rankme"} <= set(start) and "train_loss" not in start
    assert "20-NN top-1: " in stdout and "before training" in stdout
    for r in log[1:]:
        for k in health.SIGNALS:
            assert math.isfinite(r[f"train_{k}"])
        assert 1 <= r["rankme"] <= 64 and 0 <= r["train_feature_spread"] <= 1.0001
        assert r["train_prototypes_in_use"] <= 256 * 1.0001
    iters = tracking.read_history(str(out), as_dataframe=False)
    assert len(iters["iteration"]) == 40
    for k in health.SIGNALS:
        assert all(v is not None and math.isfinite(v) for v in iters[k])
    # entropy + KL is the logged loss at every iteration
    for loss, h, kl in zip(iters["loss"], iters["teacher_entropy"], iters["kl"]):
        assert h + kl == pytest.approx(loss, abs=1e-4)


def test_curves_have_the_health_panels(healthy_run, tmp_path):
    out, _ = healthy_run
    assert (out / "training_curves.png").stat().st_size > 1000
    assert tracking.read_log(str(out))[0]["epoch"] == -1
    for k in tracking.HEALTH_KEYS:
        assert k in tracking.CURVE_KEYS and k in tracking.CURVE_TITLES and k in plot_curves.COMPARE_KEYS
    png = tmp_path / "cmp.png"
    plot_curves.main(parse_plot([str(out), str(out), "--output", str(png)]))
    assert png.stat().st_size > 1000


def parse_plot(argv):
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--output", default=None)
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--keys", nargs="+", default=None)
    parser.add_argument("--all", action="store_true")
    return parser.parse_args(argv)


@pytest.mark.parametrize("name,flags,kind", [
    ("no_sharpening", ["--teacher_temp", "0.1", "--warmup_teacher_temp", "0.1"], "uniform"),
    ("no_centring", ["--center_momentum", "1.0"], "single-prototype"),
])
def test_deliberate_collapse_is_flagged_within_2_epochs(shapes, tmp_path, capsys, name, flags, kind):
    out = tmp_path / name
    with pytest.raises(utils.UserError, match=rf"collapse \({kind}\).*--stop_on_collapse"):
        run_dino(shapes, out, *flags, "--stop_on_collapse", "true")
    stdout = capsys.readouterr().out
    warnings = [line for line in stdout.splitlines() if line.startswith("WARNING: collapse")]
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING: collapse ({kind}) at iteration "), stdout[-3000:]
    it = int(warnings[0].split("at iteration ")[1].split(",")[0])
    assert it < 40  # within the first 2 epochs (20 steps each)
    print(f"{name}: {warnings[0]}", file=__import__("sys").stderr)
    # stopped there: the last checkpoint is the one of the end of epoch 0, untouched
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and "position" not in ckpt
    assert [r["epoch"] for r in read_log(out)] == [0]
    if name == "no_centring":
        assert torch.count_nonzero(ckpt["dino_loss"]["center"]) == 0  # momentum 1.0: the centre stays zero


# ----------------------------------------------------------------------------------------------------
# Flags and main_distill.py
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--center_momentum", "1.5"], "--center_momentum must be in [0, 1]"),
    (["--knn_eval_at_start", "true"], "--knn_eval_at_start needs --knn_data_path"),
    (["--health_probe_size", "-1"], "--health_probe_size must not be negative"),
])
def test_flag_errors(tmp_path, flags, message):
    with pytest.raises(utils.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        main_dino.check_args(parse(main_dino, "--data_path", "synthetic", "--output_dir", tmp_path, *flags))


def test_center_momentum_reaches_the_loss():
    args = parse(main_dino, "--center_momentum", "0.5")
    assert args.center_momentum == 0.5 and parse(main_dino).center_momentum == 0.9


def test_distill_logs_the_signals(distill_run):
    _, out, stdout = distill_run
    iters = tracking.read_history(str(out), as_dataframe=False)
    for k in health.SIGNALS:
        assert all(v is not None and math.isfinite(v) for v in iters[k])
    for loss, h, kl in zip(iters["dino_loss"], iters["teacher_entropy"], iters["kl"]):
        assert h + kl == pytest.approx(loss, abs=1e-4)
    for r in read_log(out):
        assert {f"train_{k}" for k in health.SIGNALS} <= set(r) and r["rankme"] >= 1
