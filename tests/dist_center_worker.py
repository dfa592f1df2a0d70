"""Run under torchrun: each rank computes DINOLoss on its shard of one fixed global batch.

Writes the loss, the centre and the gradient of its shard to OUT_DIR/rank{r}.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from losses import DINOLoss  # noqa: E402

OUT_DIM, NCROPS, BATCH = 32, 4, 6  # global batch of 6 images, 3 per rank


def global_batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(NCROPS, BATCH, OUT_DIM, generator=g)  # [crop, image, dim]
    teacher = torch.randn(2, BATCH, OUT_DIM, generator=g)
    return student, teacher


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher = global_batch()
    per_rank = BATCH // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    # crop-major rows, as MultiCropWrapper produces them
    s = student[:, shard].reshape(-1, OUT_DIM).clone().requires_grad_(True)
    t = teacher[:, shard].reshape(-1, OUT_DIM)
    loss_fn = DINOLoss(OUT_DIM, NCROPS, 0.04, 0.07, 3, 10)
    losses = []
    for epoch in range(2):
        loss = loss_fn(s, t, epoch)
        losses.append(loss.detach())
    loss.backward()
    torch.save({"losses": torch.stack(losses), "center": loss_fn.center.clone(), "grad": s.grad},
               os.path.join(os.environ["OUT_DIR"], f"rank{rank}.pt"))
    runtime.barrier()
    runtime.leave_without_finalization(0)  # how our scripts end (runtime.run_script): no gloo teardown abort


if __name__ == "__main__":
    main()
