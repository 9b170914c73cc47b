"""Fixed pretrained networks that both the metrics and the training losses use: LPIPS and the FID Inception.

They live apart from `training` and `evaluation` so that neither imports the other; neither needs torchvision.
"""

from klvae.nets.inception import InceptionV3Features
from klvae.nets.lpips import LPIPS
from klvae.nets.pretrained import FrozenNet

__all__ = ["LPIPS", "FrozenNet", "InceptionV3Features"]
