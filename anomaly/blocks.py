"""Network blocks the autoencoders and DRAEM share (torch only)."""

from __future__ import annotations

from torch import nn


def down(cin: int, cout: int) -> nn.Sequential:
    """A stride-2 stage: halves the resolution, ``cin`` -> ``cout`` channels."""
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True))


def up(cin: int, cout: int) -> nn.Sequential:
    """A transposed-conv stage: doubles the resolution."""
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, True),
    )


def widths(base: int, depth: int) -> list[int]:
    """Channels per stage: doubling from ``base``, capped at ``8 * base``."""
    return [min(base * 2**i, base * 8) for i in range(depth)]
