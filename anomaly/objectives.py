"""The reconstruction models' training objectives (DRAEM's is in :mod:`defectkit.anomaly.draem`)."""

from __future__ import annotations


def loss_fn(kind: str, ssim_lambda: float):
    import kornia
    import torch

    def loss(x, recon):
        mse = torch.mean((x - recon) ** 2)
        if kind == "mse":
            return mse
        dssim = 2 * kornia.losses.ssim_loss(recon, x, window_size=11)  # kornia gives (1 - SSIM) / 2
        return dssim if kind == "ssim" else mse + ssim_lambda * dssim

    return loss


def reconstruction_objective(loss, kl_weight: float = 0.0):
    """The autoencoders' step loss: reconstruct the good image (plus the VAE's KL term)."""

    def objective(model, x, keys=None):
        value = loss(x.float(), model(x).float())
        if kl_weight and hasattr(model, "kl"):
            value = value + kl_weight * model.kl
        return value

    return objective
