"""Network definitions."""

from cfgdiff.models.classifier import NoisyClassifier
from cfgdiff.models.unet import UNet

__all__ = ["NoisyClassifier", "UNet"]
