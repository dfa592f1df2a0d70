# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Follows KoLeoLoss of facebookresearch/dinov2 (Apache 2.0).
"""KoLeo regulariser (Kozachenko-Leonenko differential entropy estimator, Sablayrolles et al. 2019):
spreads the L2-normalised features of a batch uniformly over the sphere.

Self-contained (torch only): copy this file alone into other code.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class KoLeoLoss(nn.Module):
    """loss = -(1/B) sum_i log(||x_i - x_nn(i)|| + eps), x_i = x_i / ||x_i||, nn(i) = nearest other row.

    Maximising the log-distance to the nearest neighbour pushes close features apart; the log makes the
    closest pairs dominate. As DINOv2: the neighbour is the argmax of the dot products (= argmin of the
    Euclidean distance between unit vectors), found without gradient; the distance is
    `nn.PairwiseDistance(2, eps=1e-8)`, i.e. ||x_i - x_nn + 1e-8||, which keeps the gradient finite (large,
    but finite) when two rows coincide, where the plain norm would be 0 with an undefined gradient.
    Local to the batch it is given (no all-gather across ranks, as DINOv2); DINOv2 applies it to the
    backbone CLS token of each global crop separately and sums the two.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] with B >= 2. Returns a scalar (float32 for half inputs, float64 for float64)."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeoLoss: needs [B >= 2, D] features, got {tuple(x.shape)}")
        # autocast off: nearest neighbours and log-distances need float32
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                dots = x @ x.t()
                # exclude self. DINOv2 writes -1 on the diagonal; -inf also excludes it when every other
                # row is exactly antipodal (dot -1, a tie argmax could resolve to self).
                dots.fill_diagonal_(float("-inf"))
                nn_index = dots.argmax(dim=1)
            distances = self.pdist(x, x[nn_index])  # differentiable w.r.t. both x_i and its neighbour
            return -torch.log(distances + self.eps).mean()
