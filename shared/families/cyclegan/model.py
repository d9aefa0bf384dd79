"""Seed 004's generative half: a CycleGAN per view (CC, MLO) that translates a low-energy /
FFDM image (domain A) into a recombined dual-energy (DES, "CESM") image (domain B).

Zhu et al.'s architecture at a size for CPU federations: a ResNet generator (c7s1 stem, two
stride-2 downsamplings, residual blocks, two upsamplings, c7s1 out) and a 70x70-style PatchGAN
discriminator (three stride-2 convolutions), instance normalisation throughout. Images are in
[0, 1] (the preprocessing's range), so the generators end in a sigmoid where the paper's tanh
maps to [-1, 1]. Instance norm has no running statistics: the state dict holds weights only,
so averaging it is averaging the networks.
"""

from __future__ import annotations

import torch
from torch import nn

from fedbreast.shared.config import RunConfig

VIEWS = ("cc", "mlo")


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """One image in, one image out, same size (height and width divisible by 4)."""

    def __init__(self, filters: int = 16, blocks: int = 3) -> None:
        super().__init__()
        f = filters
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(1, f, 7), _norm(f), nn.ReLU(inplace=True)]
        for mult in (1, 2):  # downsampling: f -> 2f -> 4f
            layers += [nn.Conv2d(f * mult, f * mult * 2, 3, stride=2, padding=1), _norm(f * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(4 * f) for _ in range(blocks)]
        for mult in (4, 2):  # upsampling: 4f -> 2f -> f
            layers += [
                nn.ConvTranspose2d(f * mult, f * mult // 2, 3, stride=2, padding=1, output_padding=1),
                _norm(f * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(f, 1, 7), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """A map of real/fake logits, one per overlapping patch (PatchGAN)."""

    def __init__(self, filters: int = 16) -> None:
        super().__init__()
        f = filters
        self.net = nn.Sequential(
            nn.Conv2d(1, f, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(f, 2 * f, 4, stride=2, padding=1),
            _norm(2 * f),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * f, 4 * f, 4, stride=2, padding=1),
            _norm(4 * f),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * f, 8 * f, 4, stride=1, padding=1),
            _norm(8 * f),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(8 * f, 1, 4, stride=1, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViewCycleGAN(nn.Module):
    """The two generators (A -> B: FFDM/LE to DES; B -> A) and two discriminators of one view."""

    def __init__(self, filters: int, blocks: int) -> None:
        super().__init__()
        self.g_ab = ResnetGenerator(filters, blocks)
        self.g_ba = ResnetGenerator(filters, blocks)
        self.d_a = PatchDiscriminator(filters)
        self.d_b = PatchDiscriminator(filters)


class CycleGANNet(nn.Module):
    """One CycleGAN per view, trained independently (seed 004); ``forward``: virtual DES."""

    def __init__(self, filters: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.views = nn.ModuleDict({v: ViewCycleGAN(filters, blocks) for v in VIEWS})

    def forward(self, x: torch.Tensor, view: str) -> torch.Tensor:
        """Synthetic DES for a batch of one view's FFDM / LE images (B, 1, H, W) in [0, 1]."""
        net: ViewCycleGAN = self.views[view]  # type: ignore[assignment]  # ModuleDict items are Modules
        return net.g_ab(x)

    @staticmethod
    def is_discriminator(key: str) -> bool:
        """Whether a state-dict key belongs to a discriminator (kept at the site under
        ``cyclegan-aggregate = generators``)."""
        return ".d_a." in key or ".d_b." in key


def build(cfg: RunConfig) -> CycleGANNet:
    return CycleGANNet(cfg.cyclegan_filters, cfg.cyclegan_blocks)
