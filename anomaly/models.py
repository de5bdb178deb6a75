"""Autoencoder models (torch only; no training or scoring here).

Every model maps ``(B, C, H, W)`` in [0, 1] to a reconstruction of the same shape and exposes
``encode(x) -> (B, D)``, a global latent used for kNN / PCA scoring and projections.
``H`` and ``W`` must be multiples of ``2 ** depth`` (fully convolutional models take any such
size, so patches and whole images alike).
"""

from __future__ import annotations

import torch
from torch import nn

from defectkit.anomaly.blocks import down, up, widths


class ConvAE(nn.Module):
    """Convolutional autoencoder: ``depth`` stride-2 stages down to a ``latent``-channel bottleneck."""

    def __init__(self, in_ch: int = 3, base: int = 32, depth: int = 4, latent: int = 64):
        super().__init__()
        w = widths(base, depth)
        self.encoder = nn.Sequential(
            *[down(cin, cout) for cin, cout in zip([in_ch, *w[:-1]], w, strict=True)], nn.Conv2d(w[-1], latent, 1)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, w[-1], 1),
            nn.LeakyReLU(0.2, True),
            *[up(cin, cout) for cin, cout in zip(w[::-1], [*w[::-1][1:], base], strict=True)],
            nn.Conv2d(base, in_ch, 3, 1, 1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class UNetAE(nn.Module):
    """U-Net autoencoder.  Skip connections let a U-Net copy anomalies straight through, so
    ``skips`` says which levels keep theirs (0 = the shallowest, full-resolution level).  The
    default drops the two shallowest; ``skips=()`` is a plain autoencoder with U-Net widths."""

    def __init__(
        self, in_ch: int = 3, base: int = 32, depth: int = 4, latent: int = 64, skips: tuple[int, ...] | None = None
    ):
        super().__init__()
        self.depth = depth
        self.skips = tuple(range(2, depth - 1)) if skips is None else tuple(skips)
        w = widths(base, depth)
        self.downs = nn.ModuleList(down(cin, cout) for cin, cout in zip([in_ch, *w[:-1]], w, strict=True))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(w[-1], latent, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(latent, w[-1], 1)
        )
        # up stage i produces the resolution of down stage (depth - 2 - i); it concatenates that
        # stage's features when the level is in `skips`
        self.ups = nn.ModuleList()
        for i in range(depth):
            cin = w[depth - 1 - i]
            cout = w[depth - 2 - i] if i < depth - 1 else base
            self.ups.append(up(cin, cout))
            level = depth - 2 - i
            self.ups.append(nn.Conv2d(cout * 2, cout, 1) if level in self.skips else nn.Identity())
        self.head = nn.Sequential(nn.Conv2d(base, in_ch, 3, 1, 1), nn.Sigmoid())

    def _features(self, x):
        feats = []
        for d in self.downs:
            x = d(x)
            feats.append(x)
        return feats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck[0](self._features(x)[-1]).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._features(x)
        y = self.bottleneck(feats[-1])
        for i in range(self.depth):
            y = self.ups[2 * i](y)
            level = self.depth - 2 - i
            if level in self.skips:
                y = self.ups[2 * i + 1](torch.cat([y, feats[level]], 1))
        return self.head(y)


class FCAE(nn.Module):
    """Fully-connected autoencoder on the flattened image (small inputs: 32-64 px)."""

    def __init__(self, in_ch: int = 3, size: int = 64, hidden: tuple[int, ...] = (512, 128), latent: int = 32):
        super().__init__()
        self.shape = (in_ch, size, size)
        n = in_ch * size * size
        dims = [n, *hidden, latent]
        enc, dec = [], []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            enc += [nn.Linear(a, b), nn.LeakyReLU(0.2, True)]
        for a, b in zip(dims[::-1][:-1], dims[::-1][1:], strict=True):
            dec += [nn.Linear(a, b), nn.LeakyReLU(0.2, True)]
        self.encoder = nn.Sequential(nn.Flatten(), *enc[:-1])
        self.decoder = nn.Sequential(*dec[:-1], nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"FCAE was built for inputs {self.shape}, got {tuple(x.shape[1:])}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x)).view(-1, *self.shape)


class ConvVAE(nn.Module):
    """Convolutional VAE with a spatial Gaussian latent (``latent`` channels per position).

    ``forward`` returns the reconstruction from the posterior mean in eval mode and a sample in
    training; ``self.kl`` holds the last batch's mean KL divergence for the loss.
    """

    def __init__(self, in_ch: int = 3, base: int = 32, depth: int = 4, latent: int = 16):
        super().__init__()
        ae = ConvAE(in_ch, base, depth, latent)
        self.encoder = ae.encoder[:-1]
        w = widths(base, depth)
        self.mu = nn.Conv2d(w[-1], latent, 1)
        self.logvar = nn.Conv2d(w[-1], latent, 1)
        self.decoder = ae.decoder
        self.kl = torch.zeros(())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.mu(self.encoder(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        self.kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        return self.decoder(z)
