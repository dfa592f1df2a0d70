"""Losses, one file each; every file imports only torch, numpy and the standard library."""
from .dino import DINOLoss

__all__ = ["DINOLoss"]
