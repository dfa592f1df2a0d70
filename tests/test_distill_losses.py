"""Losses of main_distill.py (losses/ibot.py, koleo.py, cls_token.py, spd.py, gram.py, and Sinkhorn-Knopp in
dino.py), each against an independent brute-force version written here with plain loops on small inputs.

Process groups: a real 1-process gloo group in this process, and a 2-process gloo group (spawned) in which
the ranks hold different shards of one global batch.
"""
import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import losses  # noqa: E402
from losses import (CLSTokenLoss, DINOLoss, GramLoss, KoLeoLoss, SPDLoss, gram_loss, iBOTPatchLoss,  # noqa: E402
                    sinkhorn_knopp, spd_loss, sym_logm)
import reference_dinov3_gram as ref_gram  # noqa: E402  (DINOv3's GramLoss beside this file; tests/ is on sys.path)

D64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Brute-force references: Python floats and loops only (no vectorised torch maths).
# --------------------------------------------------------------------------------------------------
def bf_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def bf_log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def bf_sinkhorn(logits, temp, n_iterations):
    """DINOv2's sinkhorn_knopp_teacher, literally, on a list of rows [B][K]: returns [B][K]."""
    b_total, k = len(logits), len(logits[0])
    q = [[math.exp(logits[b][p] / temp) for b in range(b_total)] for p in range(k)]  # [K][B]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        for p in range(k):
            s = sum(q[p])
            q[p] = [v / s / k for v in q[p]]
        for b in range(b_total):
            s = sum(q[p][b] for p in range(k))
            for p in range(k):
                q[p][b] = q[p][b] / s / b_total
    return [[q[p][b] * b_total for p in range(k)] for b in range(b_total)]


def bf_ibot(student, teacher, masks, center, temp, student_temp=0.1, probs=None):
    """student, teacher: [B][N][K] lists; masks [B][N] bools; probs (optional) [B][N][K] teacher targets."""
    total = 0.0
    for i in range(len(masks)):
        positions = [j for j in range(len(masks[i])) if masks[i][j]]
        image = 0.0
        for j in positions:
            if probs is None:
                p_t = bf_softmax([(teacher[i][j][k] - center[k]) / temp for k in range(len(center))])
            else:
                p_t = probs[i][j]
            logp_s = bf_log_softmax([v / student_temp for v in student[i][j]])
            image -= sum(a * b for a, b in zip(p_t, logp_s))
        if positions:
            image /= len(positions)
        total += image  # an image without masked patches adds 0 but counts below
    return total / len(masks)


def bf_masked_mean(teacher, masks):
    k = len(teacher[0][0])
    sums, count = [0.0] * k, 0
    for i in range(len(masks)):
        for j in range(len(masks[i])):
            if masks[i][j]:
                count += 1
                sums = [a + b for a, b in zip(sums, teacher[i][j])]
    return [v / count for v in sums]


def bf_normalize(row):
    n = math.sqrt(sum(v * v for v in row))
    return [v / n for v in row]


def bf_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def finite_difference(fn, x, h=1e-6):
    """Central differences of a scalar fn at x (float64), one coordinate at a time."""
    flat = x.detach().reshape(-1)
    grad = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        grad[i] = (fn((flat + e).view_as(x)) - fn((flat - e).view_as(x))) / (2 * h)
    return grad.view_as(x)


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------
def _logits(seed, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_sinkhorn_knopp_matches_brute_force_and_marginals():
    logits = _logits(0, 6, 8)  # B=6 samples, K=8 prototypes
    for temp, n_it in [(0.07, 3), (0.5, 1), (0.2, 10)]:
        ours = sinkhorn_knopp(logits.float(), temp, n_iterations=n_it)
        assert ours.dtype == torch.float32 and not ours.requires_grad
        ref = torch.tensor(bf_sinkhorn(logits.tolist(), temp, n_it), dtype=D64)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.sum(1), torch.ones(6), rtol=0, atol=1e-6)  # every sample's row
    # Prototype marginals: a brute-force run with many iterations converges to B/K for every prototype,
    # ours with as many iterations lands there too; 3 iterations get most of the way from the softmax.
    temp = 0.1
    ref_long = torch.tensor(bf_sinkhorn(logits.tolist(), temp, 300), dtype=D64)
    torch.testing.assert_close(ref_long.sum(0), torch.full((8,), 6 / 8, dtype=D64), rtol=0, atol=1e-6)
    torch.testing.assert_close(ref_long.sum(1), torch.ones(6, dtype=D64), rtol=0, atol=1e-9)
    torch.testing.assert_close(sinkhorn_knopp(logits.float(), temp, 300).double(), ref_long, rtol=1e-4, atol=1e-6)
    off = lambda p: (p.sum(0) - 6 / 8).abs().max().item()  # noqa: E731
    softmax_off = off(torch.softmax(logits / temp, 1))
    three_off = off(sinkhorn_knopp(logits.float(), temp).double())
    assert three_off < 0.5 * softmax_off, (three_off, softmax_off)


def test_sinkhorn_knopp_large_logits_and_autocast():
    # logits / temp up to ~150: exp overflows float32 (DINOv2's exp-domain code would give inf/NaN)
    logits = _logits(1, 5, 7, scale=3.0)
    temp = 0.04
    ours = sinkhorn_knopp(logits.float(), temp)
    assert torch.isfinite(ours).all()
    ref = torch.tensor(bf_sinkhorn(logits.tolist(), temp, 3), dtype=D64)  # float64: no overflow
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sinkhorn_knopp(logits.to(torch.bfloat16), 0.07)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, sinkhorn_knopp(logits.to(torch.bfloat16).float(), 0.07))


def test_sinkhorn_knopp_one_process_group(one_process_group):
    logits = _logits(2, 6, 8).float()
    ref = torch.tensor(bf_sinkhorn(logits.double().tolist(), 0.07, 3), dtype=D64)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.07).double(), ref, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# DINOLoss(centering="sinkhorn_knopp")
# --------------------------------------------------------------------------------------------------
def bf_dino_sk(student, teacher, ncrops, temp, student_temp=0.1):
    """student [ncrops*B][K], teacher [2*B][K] lists: SK over both teacher crops together, then the mean
    over the (teacher view, other student view) pairs of the per-image cross-entropy."""
    b = len(teacher) // 2
    q = bf_sinkhorn(teacher, temp, 3)
    total, n_terms = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            pair = 0.0
            for i in range(b):
                logp = bf_log_softmax([x / student_temp for x in student[v * b + i]])
                pair -= sum(a * c for a, c in zip(q[iq * b + i], logp))
            total += pair / b
            n_terms += 1
    return total / n_terms


def test_dino_loss_sinkhorn_knopp_matches_hand_loop_and_keeps_center():
    ncrops, b, k = 4, 3, 10
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.07, 2, 5, centering="sinkhorn_knopp")
    assert loss_fn.centering == "sinkhorn_knopp"
    assert DINOLoss(k, ncrops, 0.04, 0.07, 2, 5).centering == "centering"  # default unchanged
    for epoch in [0, 1, 4]:
        s = _logits(10 + epoch, ncrops * b, k).float().requires_grad_(True)
        t = (_logits(20 + epoch, 2 * b, k) + 0.5).float().requires_grad_(True)  # non-zero mean
        loss = loss_fn(s, t, epoch)
        expected = bf_dino_sk(s.double().tolist(), t.double().tolist(), ncrops, loss_fn.teacher_temp(epoch))
        assert loss.dim() == 0
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        loss.backward()
        assert t.grad is None and torch.isfinite(s.grad).all()
        assert torch.equal(loss_fn.center, torch.zeros(1, k))  # neither used nor updated
    assert set(loss_fn.state_dict()) == {"center"}
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(k, ncrops, 0.04, 0.07, 2, 5, centering="sinkhorn")


# --------------------------------------------------------------------------------------------------
# iBOT
# --------------------------------------------------------------------------------------------------
def _ibot_inputs(seed, b=4, n=6, k=5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, k, generator=g, dtype=D64).float()
    t = (torch.randn(b, n, k, generator=g, dtype=D64) + torch.linspace(-1, 1, k, dtype=D64)).float()
    masks = torch.rand(b, n, generator=g) < 0.5
    masks[0] = False  # an image without any masked patch
    masks[1, :2] = True  # make sure some are masked
    return s, t, masks


def test_ibot_matches_brute_force_and_center_ema():
    s, t, masks = _ibot_inputs(0)
    loss_fn = iBOTPatchLoss(5, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                            nepochs=10, student_temp=0.1, center_momentum=0.9)
    assert tuple(loss_fn.center.shape) == (1, 1, 5)
    assert [loss_fn.teacher_temp(e) for e in (0, 1, 2, 9, 50)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    center = [0.0] * 5
    for step, epoch in enumerate([0, 1, 5]):
        s, t, masks = _ibot_inputs(step)
        sg, tg = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = loss_fn(sg, tg, masks, epoch)
        expected = bf_ibot(s.double().tolist(), t.double().tolist(), masks.tolist(), center,
                           loss_fn.teacher_temp(epoch))
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        # center <- 0.9 center + 0.1 mean of the teacher logits over the MASKED patches
        mean = bf_masked_mean(t.double().tolist(), masks.tolist())
        center = [0.9 * c + 0.1 * m for c, m in zip(center, mean)]
        torch.testing.assert_close(loss_fn.center.view(-1).double(), torch.tensor(center, dtype=D64),
                                   rtol=1e-5, atol=1e-7)
        loss.backward()
        assert tg.grad is None
        # no gradient reaches unmasked student patches
        assert torch.equal(sg.grad[~masks], torch.zeros_like(sg.grad[~masks]))
        assert sg.grad[masks].abs().sum() > 0


def test_ibot_masked_rows_layout_equals_full_layout():
    # main_distill runs the heads on the masked tokens only and passes [M, K] rows in tensor[masks] order
    full = iBOTPatchLoss(5, warmup_teacher_temp_epochs=0, nepochs=3)
    rows = iBOTPatchLoss(5, warmup_teacher_temp_epochs=0, nepochs=3)
    for step in range(3):
        s, t, masks = _ibot_inputs(step)
        assert full(s, t, masks, 1).item() == pytest.approx(rows(s[masks], t[masks], masks, 1).item(), rel=1e-6)
        torch.testing.assert_close(full.center, rows.center)


def test_ibot_counts_only_masked_patches():
    s, t, masks = _ibot_inputs(3)
    loss_fn = iBOTPatchLoss(5)
    base = loss_fn(s, t, masks, 0).item()
    # change every unmasked student and teacher token: neither the loss nor the center update changes
    s2, t2 = s.clone(), t.clone()
    s2[~masks] = 100 * torch.randn_like(s2[~masks])
    t2[~masks] = -50.0
    loss_fn2 = iBOTPatchLoss(5)
    assert loss_fn2(s2, t2, masks, 0).item() == pytest.approx(base, rel=1e-6)
    torch.testing.assert_close(loss_fn2.center, loss_fn.center)
    # the image without masked patches (image 0) adds 0 but counts in the mean over the B images
    rest = iBOTPatchLoss(5)(s[1:], t[1:], masks[1:], 0).item()
    assert base == pytest.approx(rest * 3 / 4, rel=1e-6)
    # no masked patch at all: loss 0, center unchanged
    none_fn = iBOTPatchLoss(5)
    none_fn.center.fill_(0.25)
    zero = none_fn(s.requires_grad_(True), t, torch.zeros_like(masks), 0)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(none_fn.center, torch.full((1, 1, 5), 0.25))


def test_ibot_teacher_probs_given():
    s, t, masks = _ibot_inputs(4)
    loss_fn = iBOTPatchLoss(5)
    probs_masked = sinkhorn_knopp(t[masks], 0.07)  # [M, K], the DINOv2 way
    dense = torch.zeros_like(t)
    dense[masks] = probs_masked
    expected = bf_ibot(s.double().tolist(), None, masks.tolist(), None, None, probs=dense.double().tolist())
    assert loss_fn(s, t, masks, 0, teacher_probs=probs_masked).item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn(s, None, masks, 0, teacher_probs=dense).item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(loss_fn.center, torch.zeros(1, 1, 5))  # not used, not updated
    with pytest.raises(ValueError):
        loss_fn(s, t, masks, 0, teacher_probs=probs_masked[1:])


def test_ibot_center_one_process_group(one_process_group):
    s, t, masks = _ibot_inputs(5)
    loss_fn = iBOTPatchLoss(5, center_momentum=0.8)
    loss = loss_fn(s, t, masks, 0)
    assert loss.item() == pytest.approx(bf_ibot(s.double().tolist(), t.double().tolist(), masks.tolist(),
                                                [0.0] * 5, 0.04), rel=1e-5)
    mean = bf_masked_mean(t.double().tolist(), masks.tolist())
    torch.testing.assert_close(loss_fn.center.view(-1).double(), 0.2 * torch.tensor(mean, dtype=D64),
                               rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Two processes: different inputs per rank, the result of one process on the concatenated batch
# --------------------------------------------------------------------------------------------------
def _dist_inputs():
    g = torch.Generator().manual_seed(123)
    sk_logits = torch.randn(8, 6, generator=g)  # rank 0 gets rows 0..2, rank 1 rows 3..7 (unequal)
    ibot_s = torch.randn(4, 5, 6, generator=g)
    ibot_t = torch.randn(4, 5, 6, generator=g) + 0.3
    masks = torch.zeros(4, 5, dtype=torch.bool)
    masks[0, :1] = True  # rank 0 (images 0, 1): 1 + 2 masked patches; rank 1 (images 2, 3): 5 + 0
    masks[1, 2:4] = True
    masks[2] = True
    dino_s = torch.randn(4, 4, 6, generator=g)  # [ncrops, B=4 images, K]; 2 images per rank
    dino_t = torch.randn(2, 4, 6, generator=g)
    return sk_logits, ibot_s, ibot_t, masks, dino_s, dino_t


def _dist_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sk_logits, ibot_s, ibot_t, masks, dino_s, dino_t = _dist_inputs()
        rows = slice(0, 3) if rank == 0 else slice(3, 8)
        images = slice(2 * rank, 2 * rank + 2)
        sk = sinkhorn_knopp(sk_logits[rows], 0.1)
        ibot = iBOTPatchLoss(6)
        ibot_losses = [ibot(ibot_s[images], ibot_t[images], masks[images], e) for e in range(2)]
        dino = DINOLoss(6, 4, 0.04, 0.07, 2, 5, centering="sinkhorn_knopp")
        dino_loss = dino(dino_s[:, images].reshape(-1, 6), dino_t[:, images].reshape(-1, 6), 0)
        torch.save({"sk": sk, "ibot_losses": torch.stack(ibot_losses), "ibot_center": ibot.center,
                    "dino_loss": dino_loss}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_concatenated_batch(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or a process group already exists")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    sk_logits, ibot_s, ibot_t, masks, dino_s, dino_t = _dist_inputs()
    # Sinkhorn-Knopp: each rank holds its rows of SK on the concatenated batch (3 + 5 rows)
    full = sinkhorn_knopp(sk_logits, 0.1)
    torch.testing.assert_close(torch.cat([r0["sk"], r1["sk"]]), full, rtol=1e-5, atol=1e-7)
    ref = torch.tensor(bf_sinkhorn(sk_logits.double().tolist(), 0.1, 3), dtype=D64)
    torch.testing.assert_close(torch.cat([r0["sk"], r1["sk"]]).double(), ref, rtol=1e-5, atol=1e-7)
    # iBOT: same center on both ranks = the single-process center of the whole batch (masked patches
    # counted over ranks: 3 on rank 0, 5 on rank 1); the mean of the rank losses = the full-batch loss
    ibot = iBOTPatchLoss(6)
    full_losses = [ibot(ibot_s, ibot_t, masks, e) for e in range(2)]
    for r in (r0, r1):
        torch.testing.assert_close(r["ibot_center"], ibot.center, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((r0["ibot_losses"] + r1["ibot_losses"]) / 2, torch.stack(full_losses),
                               rtol=1e-5, atol=1e-6)
    mean = bf_masked_mean(ibot_t.double().tolist(), masks.tolist())
    once = 0.1 * torch.tensor(mean, dtype=D64)
    torch.testing.assert_close(r0["ibot_center"].view(-1).double(), 0.9 * once + 0.1 * torch.tensor(mean, dtype=D64),
                               rtol=1e-5, atol=1e-7)
    # DINOLoss with Sinkhorn-Knopp: the mean of the rank losses is the full-batch loss
    dino = DINOLoss(6, 4, 0.04, 0.07, 2, 5, centering="sinkhorn_knopp")
    full_dino = dino(dino_s.reshape(-1, 6), dino_t.reshape(-1, 6), 0)
    torch.testing.assert_close((r0["dino_loss"] + r1["dino_loss"]) / 2, full_dino, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------------
def bf_koleo(x, eps=1e-8):
    rows = [bf_normalize(r) for r in x]
    total = 0.0
    for i, a in enumerate(rows):
        best = min(math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b))) for j, b in enumerate(rows) if j != i)
        total -= math.log(best + eps)
    return total / len(rows)


def test_koleo_matches_double_loop_and_gradcheck():
    x = _logits(7, 6, 4)
    assert KoLeoLoss()(x.float()).item() == pytest.approx(bf_koleo(x.tolist()), rel=1e-5)
    assert KoLeoLoss()(x).dtype == D64
    assert torch.autograd.gradcheck(KoLeoLoss(), (x.clone().requires_grad_(True),))
    # per-row scale does not matter (features are normalised)
    scaled = x * torch.arange(1, 7, dtype=D64)[:, None]
    assert KoLeoLoss()(scaled).item() == pytest.approx(bf_koleo(x.tolist()), rel=1e-6)


def test_koleo_duplicate_rows_have_finite_gradients():
    x = _logits(8, 5, 3)
    x[3] = x[1]
    x[4] = 2 * x[1]  # same direction: three identical rows after normalisation
    for dtype in (torch.float32, D64):
        xg = x.to(dtype).requires_grad_(True)
        loss = KoLeoLoss()(xg)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all()
    with pytest.raises(ValueError):
        KoLeoLoss()(torch.randn(1, 3))


# --------------------------------------------------------------------------------------------------
# CLS token
# --------------------------------------------------------------------------------------------------
def test_cls_token_loss_hand_computed():
    torch.manual_seed(0)
    loss_fn = CLSTokenLoss(3, 5)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    w, bias = loss_fn.proj.weight.double().tolist(), loss_fn.proj.bias.double().tolist()
    expected = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        p = [bf_dot(w[o], si) + bias[o] for o in range(5)]
        cos = bf_dot(p, ti) / math.sqrt(bf_dot(p, p) * bf_dot(ti, ti))
        expected += (1 - cos) / 4
    loss = loss_fn(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert t.grad is None  # teacher detached
    assert s.grad is not None and loss_fn.proj.weight.grad.abs().sum() > 0  # the projection is trained
    assert {n for n, _ in loss_fn.named_parameters()} == {"proj.weight", "proj.bias"}


# --------------------------------------------------------------------------------------------------
# SPD (Log-Euclidean distance of patch Gram matrices)
# --------------------------------------------------------------------------------------------------
def bf_spd(student, teacher, eps):
    """Per image: G = F F^T / N + eps I from hand-normalised rows, log through one eigh per matrix."""
    total = 0.0
    for xs, xt in zip(student, teacher):
        logs = []
        for tokens in (xs, xt):
            f = [bf_normalize(r) for r in tokens]
            n = len(f)
            g = torch.tensor([[bf_dot(f[i], f[j]) / n + (eps if i == j else 0.0) for j in range(n)]
                              for i in range(n)], dtype=D64)
            lam, v = torch.linalg.eigh(g)
            logs.append(v @ torch.diag(torch.log(lam)) @ v.T)
        diff = (logs[0] - logs[1]).tolist()
        total += sum(d * d for row in diff for d in row) / n
    return total / len(student)


def test_spd_matches_per_image_loop():
    xs, xt = _logits(11, 3, 5, 3), _logits(12, 3, 5, 7)  # student narrower than N (rank deficient)
    for eps in (1e-4, 1e-2):
        ours = spd_loss(xs, xt, eps)
        assert ours.dtype == D64
        assert ours.item() == pytest.approx(bf_spd(xs.tolist(), xt.tolist(), eps), rel=1e-8)
    ours32 = SPDLoss()(xs.float(), xt.float())
    assert ours32.dtype == torch.float32
    assert ours32.item() == pytest.approx(bf_spd(xs.tolist(), xt.tolist(), 1e-4), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SPDLoss()(xs.float(), xt.float()).dtype == torch.float32


def test_sym_logm_inverts_matrix_exp():
    f = F.normalize(_logits(13, 2, 6, 4), dim=-1)
    g = f @ f.transpose(-1, -2) / 6 + 1e-3 * torch.eye(6, dtype=D64)
    log_g = sym_logm(g)
    torch.testing.assert_close(log_g, log_g.transpose(-1, -2))
    torch.testing.assert_close(torch.matrix_exp(log_g), g, rtol=1e-9, atol=1e-12)
    a = _logits(14, 5, 5)
    sym = (a + a.T) / 4
    torch.testing.assert_close(sym_logm(torch.matrix_exp(sym)), sym, rtol=1e-9, atol=1e-11)


def test_spd_gradcheck_rank_deficient_and_full_rank():
    xt = _logits(15, 2, 5, 6)
    for d in (3, 7):  # D=3 < N=5: two eigenvalues of G equal eps; D=7: full rank
        xs = _logits(16 + d, 2, 5, d).requires_grad_(True)
        for eps in (1e-4, 1e-2):
            assert torch.autograd.gradcheck(lambda x: spd_loss(x, xt, eps), (xs,))


def test_sym_logm_gradcheck_repeated_and_close_eigenvalues():
    q = torch.linalg.qr(_logits(17, 5, 5))[0]
    for lam in ([0.5] * 5, [1e-4, 1e-4, 1e-4, 0.3, 0.7], [0.2, 0.2 + 1e-9, 0.2 + 2e-9, 1.0, 1.0 + 1e-12]):
        g = (q @ torch.diag(torch.tensor(lam, dtype=D64)) @ q.T).requires_grad_(True)
        w = _logits(18, 5, 5)
        assert torch.autograd.gradcheck(lambda m: (sym_logm(m) * w).sum(), (g,), eps=1e-10, atol=1e-5)


def test_spd_gradient_finite_and_exact_with_repeated_eigenvalues():
    xt = _logits(19, 2, 5, 6)
    # all patch tokens identical: G = J / N + eps I, eigenvalues 1 + eps and eps (x4)
    identical = _logits(20, 2, 1, 3).expand(2, 5, 3).contiguous()
    # orthonormal patch tokens: G = (1/N + eps) I, all five eigenvalues equal
    orthonormal = torch.linalg.qr(_logits(21, 7, 7))[0][:5].expand(2, 5, 7).contiguous()
    # two groups of identical tokens: a nonzero gradient and a repeated eigenvalue eps (x3)
    groups = _logits(22, 2, 2, 4).repeat_interleave(torch.tensor([3, 2]), dim=1)
    # Finite differences are themselves inexact here: eigenvalues near eps carry absolute rounding errors
    # of ~1e-16, i.e. relative ~1e-12 in log(eps=1e-4); h = 1e-5 balances that against the truncation error.
    for eps, atol in ((1e-2, 1e-8), (1e-4, 1e-6)):
        for xs in (identical, orthonormal, groups):
            xg = xs.clone().requires_grad_(True)
            spd_loss(xg, xt, eps).backward()
            assert torch.isfinite(xg.grad).all()
            fd = finite_difference(lambda x: spd_loss(x, xt, eps), xs, h=1e-5)
            torch.testing.assert_close(xg.grad, fd, rtol=1e-6, atol=atol)
        assert xg.grad.abs().max() > 0.1  # the last case is not trivially zero


def test_spd_zero_for_same_geometry_of_different_widths():
    xs = _logits(23, 3, 6, 4).requires_grad_(True)
    q = torch.linalg.qr(_logits(24, 4, 4))[0]
    xt = F.pad(xs.detach() @ q, (0, 5)) * 3.0  # rotated, padded to width 9, rescaled
    loss = spd_loss(xs, xt)
    assert abs(loss.item()) < 1e-18
    loss.backward()
    assert xs.grad.abs().max() < 1e-8  # a minimum
    assert spd_loss(xs, _logits(25, 3, 6, 9)).item() > 0.1
    with pytest.raises(ValueError):
        spd_loss(xs, _logits(25, 3, 5, 9))
    with pytest.raises(ValueError):
        spd_loss(xs, xt, eps=0.0)


def test_spd_teacher_gets_no_gradient():
    xs = _logits(26, 2, 5, 3).requires_grad_(True)
    xt = _logits(27, 2, 5, 6).requires_grad_(True)
    spd_loss(xs, xt).backward()
    assert xt.grad is None and xs.grad is not None


# --------------------------------------------------------------------------------------------------
# Gram anchoring
# --------------------------------------------------------------------------------------------------
def bf_gram_loss(student, teacher, normalize=True, clamp_student=False, clamp_teacher=False):
    """Per-image Gram MSE with loops; clamp_*: negative similarities of that side set to 0."""
    total, count = 0.0, 0
    for xs, xt in zip(student, teacher):
        fs = [bf_normalize(r) for r in xs] if normalize else xs
        ft = [bf_normalize(r) for r in xt] if normalize else xt
        for i in range(len(fs)):
            for j in range(len(fs)):
                s, t = bf_dot(fs[i], fs[j]), bf_dot(ft[i], ft[j])
                s = max(s, 0.0) if clamp_student else s
                t = max(t, 0.0) if clamp_teacher else t
                total += (s - t) ** 2
                count += 1
    return total / count


def test_gram_loss_hand_computed():
    xs = _logits(28, 3, 4, 5).float().requires_grad_(True)
    xt = _logits(29, 3, 4, 8).float().requires_grad_(True)
    loss = GramLoss()(xs, xt)
    assert loss.item() == pytest.approx(bf_gram_loss(xs.double().tolist(), xt.double().tolist()), rel=1e-5)
    loss.backward()
    assert xt.grad is None and xs.grad.abs().sum() > 0
    # same geometry at another width: 0
    q = torch.linalg.qr(_logits(30, 5, 5))[0].float()
    assert gram_loss(xs, F.pad(xs.detach() @ q, (0, 3))).item() < 1e-12
    assert gram_loss(xs, xt, img_level=False).shape == ()
    # each option against the loops: remove_neg clamps both Grams, remove_only_teacher_neg only the teacher's
    ls, lt = xs.double().tolist(), xt.double().tolist()
    for normalize in (True, False):
        for kw, clamp_s, clamp_t in [({}, False, False), ({"remove_neg": True}, True, True),
                                     ({"remove_only_teacher_neg": True}, False, True)]:
            got = gram_loss(xs, xt, normalize=normalize, **kw).item()
            want = bf_gram_loss(ls, lt, normalize, clamp_student=clamp_s, clamp_teacher=clamp_t)
            assert got == pytest.approx(want, rel=1e-5), (normalize, kw)


def test_gram_loss_remove_only_teacher_neg_keeps_student_negatives():
    """DINOv3 clamps only the teacher: a student similarity of -1/2 where the teacher's is -1/2 still costs.

    Two tokens 120 degrees apart in both: G_s = G_t = [[1, -1/2], [-1/2, 1]], clamped teacher [[1, 0], [0, 1]],
    so the loss is 2 * (1/2)^2 / 4 = 0.125 (it was 0 when the student was also clamped where the teacher < 0).
    """
    x = torch.tensor([[[1.0, 0.0], [-0.5, 3 ** 0.5 / 2]]])
    xs = x.clone().requires_grad_(True)
    loss = gram_loss(xs, x, remove_only_teacher_neg=True)
    assert loss.item() == pytest.approx(0.125, rel=1e-6)
    assert GramLoss(remove_only_teacher_neg=True)(x, x).item() == pytest.approx(0.125, rel=1e-6)
    assert ref_gram.GramLoss(remove_neg=False, remove_only_teacher_neg=True)(x, x).item() == pytest.approx(0.125)
    loss.backward()
    assert xs.grad.abs().sum() > 1e-3  # the student's negative similarity is pushed towards 0
    assert gram_loss(x, x, remove_neg=True).item() == 0.0 and gram_loss(x, x).item() < 1e-12


def test_gram_loss_rejects_both_negative_options():
    x = _logits(31, 2, 3, 4).float()
    with pytest.raises(ValueError):
        gram_loss(x, x, remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(AssertionError):  # DINOv3 refuses the combination too
        ref_gram.GramLoss(remove_neg=True, remove_only_teacher_neg=True)


GRAM_NEG_OPTIONS = [(False, False), (True, False), (False, True)]  # (remove_neg, remove_only_teacher_neg)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("remove_neg,remove_only_teacher_neg", GRAM_NEG_OPTIONS)
def test_gram_loss_matches_dinov3_reference(normalize, img_level, remove_neg, remove_only_teacher_neg):
    """Loss and student gradient equal to DINOv3's GramLoss (tests/reference_dinov3_gram.py), every option.

    Gaussian tokens: about half of all similarities are negative, many of them where the other side's are too.
    """
    xs = _logits(32, 4, 9, 6, scale=1.5).float()
    xt = _logits(33, 4, 9, 11).float()
    gs, gt = F.normalize(xs, dim=-1) @ F.normalize(xs, dim=-1).mT, F.normalize(xt, dim=-1) @ F.normalize(xt, dim=-1).mT
    assert (gt < 0).float().mean() > 0.3 and ((gs < 0) & (gt < 0)).float().mean() > 0.15

    ref = ref_gram.GramLoss(apply_norm=normalize, remove_neg=remove_neg,
                            remove_only_teacher_neg=remove_only_teacher_neg)
    ours = GramLoss(normalize=normalize, img_level=img_level, remove_neg=remove_neg,
                    remove_only_teacher_neg=remove_only_teacher_neg)
    xs_ref, xs_fn, xs_mod = (xs.clone().requires_grad_(True) for _ in range(3))
    want = ref(xs_ref, xt, img_level=img_level)
    got_fn = gram_loss(xs_fn, xt, normalize=normalize, img_level=img_level, remove_neg=remove_neg,
                       remove_only_teacher_neg=remove_only_teacher_neg)
    got_mod = ours(xs_mod, xt)
    assert got_fn.shape == got_mod.shape == want.shape == ()
    torch.testing.assert_close(got_fn, want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_mod, want.detach(), rtol=1e-5, atol=1e-7)
    for loss, x in [(want, xs_ref), (got_fn, xs_fn), (got_mod, xs_mod)]:
        loss.backward()
    torch.testing.assert_close(xs_fn.grad, xs_ref.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(xs_mod.grad, xs_ref.grad, rtol=1e-4, atol=1e-7)
    # float64 inputs: ours keeps float64, DINOv3 casts to float32; same value to float32 precision
    got64 = gram_loss(xs.double(), xt.double(), normalize=normalize, img_level=img_level, remove_neg=remove_neg,
                      remove_only_teacher_neg=remove_only_teacher_neg)
    assert got64.dtype == D64 and got64.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("img_level", [True, False])
def test_gram_loss_negative_options_change_the_value(normalize, img_level):
    """The reference comparison above is not vacuous: on these inputs the three settings all differ."""
    xs, xt = _logits(32, 4, 9, 6, scale=1.5).float(), _logits(33, 4, 9, 11).float()
    values = [gram_loss(xs, xt, normalize=normalize, img_level=img_level, remove_neg=rn,
                        remove_only_teacher_neg=rt).item() for rn, rt in GRAM_NEG_OPTIONS]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3 * max(values)


def test_exports():
    for name in ["DINOLoss", "sinkhorn_knopp", "iBOTPatchLoss", "KoLeoLoss", "CLSTokenLoss", "SPDLoss", "spd_loss",
                 "sym_logm", "GramLoss", "gram_loss"]:
        assert name in losses.__all__ and hasattr(losses, name)
