"""The replay GAN of the Relay strategy (docs/method.md#replay-gan).

StyleGAN2-style conditional generators (``LabelGenerator``, ``ImageGenerator`` with SPADE),
a projection-conditioned ResNet discriminator, differentiable adaptive discriminator
augmentation with its p controller, and the R1 / path-length regularisers. Plain PyTorch,
equalised learning rate, twice differentiable, fp32 by default and autocast-safe.
"""

from relaylearn.models.gan.ada import AdaController, AdaptiveAugment
from relaylearn.models.gan.discriminator import ProjectionDiscriminator
from relaylearn.models.gan.generator import (
    ImageGenerator,
    LabelGenerator,
    MappingNetwork,
    SynthesisNetwork,
    channels_at,
)
from relaylearn.models.gan.regularizers import path_length_penalty, r1_penalty

__all__ = [
    "AdaController",
    "AdaptiveAugment",
    "ImageGenerator",
    "LabelGenerator",
    "MappingNetwork",
    "ProjectionDiscriminator",
    "SynthesisNetwork",
    "channels_at",
    "path_length_penalty",
    "r1_penalty",
]
