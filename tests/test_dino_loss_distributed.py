"""DINOLoss across processes: the centre is the same as one process over the whole batch."""
import sys

import torch

from conftest import REPO_ROOT, run_cmd
from dist_center_worker import BATCH, NCROPS, OUT_DIM, global_batch

sys.path.insert(0, str(REPO_ROOT))
from losses import DINOLoss  # noqa: E402


def test_two_process_center_equals_single_process_center(tmp_path):
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             REPO_ROOT / "tests" / "dist_center_worker.py"], env={"OUT_DIR": str(tmp_path)}, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    student, teacher = global_batch()
    loss_fn = DINOLoss(OUT_DIM, NCROPS, 0.04, 0.07, 3, 10)
    s = student.reshape(-1, OUT_DIM).clone().requires_grad_(True)
    t = teacher.reshape(-1, OUT_DIM)
    losses = [loss_fn(s, t, epoch) for epoch in range(2)]

    # The centre is all-reduced: both ranks hold the single-process centre of the full batch.
    for r in ranks:
        torch.testing.assert_close(r["center"], loss_fn.center, rtol=1e-6, atol=1e-7)
    assert not torch.equal(loss_fn.center, torch.zeros_like(loss_fn.center))
    # The loss is a per-image mean: the mean of the two ranks' losses is the full-batch loss (the first
    # call, where both used the same zero centre; the second, where both used the synchronised centre).
    for epoch in range(2):
        torch.testing.assert_close((ranks[0]["losses"][epoch] + ranks[1]["losses"][epoch]) / 2,
                                   losses[epoch].detach(), rtol=1e-5, atol=1e-6)
    # Gradients: DDP averages them over ranks, so each rank's shard gradient is 2x the full-batch one.
    losses[1].backward()
    full_grad = s.grad.reshape(NCROPS, BATCH, OUT_DIM)
    half = BATCH // 2
    for r, rank in enumerate(ranks):
        shard_grad = rank["grad"].reshape(NCROPS, half, OUT_DIM)
        torch.testing.assert_close(shard_grad / 2, full_grad[:, r * half:(r + 1) * half], rtol=1e-5, atol=1e-7)
