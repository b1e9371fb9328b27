"""What the networks are: the shared ResNet, pretext heads, downstream heads, meta-architectures."""

from . import heads, meta_arch  # noqa: F401  (registers ResNetClassifier, Res5ROIHeadsExtraNorm, BiSSL)
from .backbone import PooledEncoder, build_resnet_trunk

__all__ = ["PooledEncoder", "build_resnet_trunk"]
