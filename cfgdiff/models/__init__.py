"""Network definitions."""

from cfgdiff.models.unet import UNet

__all__ = ["UNet"]
