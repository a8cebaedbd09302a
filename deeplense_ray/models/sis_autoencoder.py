"""SIS autoencoder (the physics-informed classifier of the PINN study), own code.

A convolutional encoder-decoder (ResNetSimple-style encoder, transposed-conv decoder) predicts ``k(x, y)``
[arcsec] per pixel, saturated to ``theta_E (1 +- k_saturation)``; the SIS lens equation
``beta = theta - k theta/|theta|`` un-lenses the image by differentiable bilinear splatting (the PINN's
"SIS_autoencoder2" sums overlapping deposits, which is what splatting does, here normalised by the weight);
a ResNet (``classifier='resnet_simple'`` or ``'resnet18'``) classifies the reconstructed source. The image is
centre-zero-padded to a multiple of 8 so the autoencoder's 3 down/up-samplings round-trip.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import InputAdapter, round_up
from .lensing import DEFAULT_PIXEL_SCALE, DEFAULT_THETA_E, InverseLensLayer, saturate_k
from .resnet import BasicBlock, ResNet18, ResNetSimple


class KAutoencoder(nn.Module):
    """Encoder (3 stride-2 residual stages) + decoder (3 transposed convs) -> one raw value per pixel."""

    def __init__(self, *, in_channels: int, width: int) -> None:
        super().__init__()
        w = width
        self.enc = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            BasicBlock(in_ch=w, out_ch=w, stride=2),
            BasicBlock(in_ch=w, out_ch=2 * w, stride=2),
            BasicBlock(in_ch=2 * w, out_ch=4 * w, stride=2),
        )  # fmt: skip
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 2, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, w, 2, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class SISAutoencoder(nn.Module):
    """See the module docstring. Input [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        pixel_scale: float | None = None,
        ae_width: int = 16,
        classifier: str = "resnet_simple",
        classifier_width: int = 32,
        dropout: float = 0.0,
        theta_E: float = DEFAULT_THETA_E,
        k_saturation: float = 0.2,
    ) -> None:
        super().__init__()
        pixel_scale = DEFAULT_PIXEL_SCALE if pixel_scale is None else float(pixel_scale)
        if not theta_E > 0:
            raise ValueError(f"theta_E must be > 0 arcsec, got {theta_E!r}")
        padded = round_up(image_size, 8)
        self.adapter = InputAdapter(
            image_size=image_size, padded_size=padded, in_channels=in_channels, out_channels=in_channels
        )
        self.k_net = KAutoencoder(in_channels=in_channels, width=ae_width)
        last = self.k_net.dec[-1]
        nn.init.normal_(last.weight, std=1e-3)  # start near the SIS: k ~ theta_E everywhere
        nn.init.zeros_(last.bias)
        self.log_theta_E = nn.Parameter(torch.tensor(math.log(theta_E)))
        self.k_saturation = float(k_saturation)
        self.inverse_lens = InverseLensLayer(num_pix=padded, pixel_scale=pixel_scale)
        classifiers = {"resnet_simple": ResNetSimple, "resnet18": ResNet18}
        if classifier not in classifiers:
            raise ValueError(f"classifier={classifier!r}; valid: {sorted(classifiers)}")
        self.classifier = classifiers[classifier](
            in_channels=in_channels, num_classes=num_classes, width=classifier_width, dropout=dropout
        )

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """k(x, y) [arcsec], [B, 1, N, N], for a padded image."""
        return saturate_k(self.k_net(x).float(), self.log_theta_E.exp(), self.k_saturation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        source, _ = self.inverse_lens(x, self.predict_k(x))
        return self.classifier(source)
