"""DCGAN for 32x32 images (Radford et al. 2016), with the generator's norm chosen by name."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.norms import make_norm


class Generator(nn.Module):
    """z (z_dim) -> 4x4x(8ngf) -> 8x8x(4ngf) -> 16x16x(2ngf) -> 32x32x3 in [-1, 1].

    `norm` applies to the hidden layers listed in `mn_layers` when it is "mn" (the others keep BN,
    so MN can replace "a few" BN layers as in the paper); "bn" and "none" apply to all three.
    """

    def __init__(self, z_dim: int = 100, ngf: int = 64, norm: str = "bn",
                 mn_layers: tuple[int, ...] = (0, 1, 2), mn_options: dict | None = None):
        super().__init__()
        self.z_dim = z_dim
        widths = [8 * ngf, 4 * ngf, 2 * ngf]
        layers: list[nn.Module] = []
        in_ch = z_dim
        for i, out_ch in enumerate(widths):
            first = i == 0
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, 1 if first else 2, 0 if first else 1, bias=False))
            layer_norm = norm if norm != "mn" or i in mn_layers else "bn"
            layers.append(make_norm(layer_norm, out_ch, mn_options))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        layers += [nn.ConvTranspose2d(in_ch, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class Discriminator(nn.Module):
    """32x32x3 -> ndf -> 2ndf -> 4ndf (4x4) -> one logit. BN on all but the first layer."""

    def __init__(self, ndf: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * ndf, 4 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(4 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * ndf, 1, 4, 1, 0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def dcgan_init(module: nn.Module) -> None:
    """Weights N(0, 0.02); norm scales N(1, 0.02), shifts 0, as in the DCGAN paper's reference code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif getattr(m, "weight", None) is not None and m.weight.dim() == 1 and not isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 1.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def build_models(cfg) -> tuple[Generator, Discriminator]:
    """Both networks from a `gan.core.config.Config`, DCGAN-initialised."""
    import dataclasses
    m = cfg.model
    G = Generator(m.z_dim, m.ngf, m.norm, tuple(m.mn_layers), dataclasses.asdict(m.mn))
    D = Discriminator(m.ndf)
    dcgan_init(G)
    dcgan_init(D)
    return G, D
