"""nnunetv2-versemi: VerSemi semi-supervised multi-dataset segmentation inside nnU-Net v2."""

__version__ = "0.1.0"
