"""Losses, one file each; every file imports only torch, numpy and the standard library."""
from .cls_token import CLSTokenLoss
from .dino import DINOLoss, sinkhorn_knopp
from .gram import GramLoss, gram_loss
from .ibot import iBOTPatchLoss
from .koleo import KoLeoLoss
from .spd import SPDLoss, spd_loss, sym_logm

__all__ = ["DINOLoss", "sinkhorn_knopp", "iBOTPatchLoss", "KoLeoLoss", "CLSTokenLoss", "SPDLoss", "spd_loss",
           "sym_logm", "GramLoss", "gram_loss"]
