"""The anomaly networks by name (a plain dict, as SAM's ``sam_model_registry``): the reconstruction
autoencoders and DRAEM, each built for an input size."""

from __future__ import annotations

from torch import nn

from defectkit.anomaly.draem import Draem
from defectkit.anomaly.models import FCAE, ConvAE, ConvVAE, UNetAE
from defectkit.core.errors import ConfigError

MODELS = {"conv_ae": ConvAE, "unet_ae": UNetAE, "fc_ae": FCAE, "vae": ConvVAE, "draem": Draem}


def build_model(
    name: str,
    in_ch: int,
    size: int,
    base: int = 32,
    depth: int = 4,
    latent: int | None = None,
    skips: tuple[int, ...] | None = None,
) -> nn.Module:
    """A model from :data:`MODELS` for ``in_ch``-channel ``size`` px inputs."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name != "fc_ae" and size % 2**depth:
        raise ConfigError(f"input size {size} must be a multiple of 2**depth = {2**depth}")
    if name == "fc_ae":
        return FCAE(in_ch, size, latent=latent or 32)
    if name == "draem":
        return Draem(in_ch, base, depth, latent or 64)
    if name == "unet_ae":
        return UNetAE(in_ch, base, depth, latent or 64, skips)
    if name == "vae":
        return ConvVAE(in_ch, base, depth, latent or 16)
    return ConvAE(in_ch, base, depth, latent or 64)
