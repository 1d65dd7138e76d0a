"""Small models around every fusion layer, built as users build them (two linear encoders, the
fusion layer with its default arguments, a linear decoder), for the export and torch.func tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import gpoe_fusion as gf

FEATURE_DIMS = (5, 7)
LATENT_DIM = 8

# Every layer kind, with default arguments (small hidden widths keep the tests fast).
LAYERS = {
    "poe": lambda: gf.PoE(),
    "gpoe-joint": lambda: gf.GPoE(2, LATENT_DIM, FEATURE_DIMS, "joint", hidden=(16,)),
    "gpoe-independent": lambda: gf.GPoE(2, LATENT_DIM, FEATURE_DIMS, "independent", hidden=(16,)),
    "gpoe-global": lambda: gf.GPoE(2, LATENT_DIM, credibility="global"),
    "gpoe-entropy": lambda: gf.GPoE(2, LATENT_DIM, credibility="entropy"),
    "moe": lambda: gf.MoE(),
    "mopoe": lambda: gf.MoPoE(),
}


class EncodeFuseDecode(nn.Module):
    """Features x1 [B, 5], x2 [B, 7] -> (decoded [B, 3], the fusion's mu and logvar: [B, D] for a
    Gaussian, [K, B, D] per component for a mixture, whose mean is decoded)."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(dim, 2 * LATENT_DIM) for dim in FEATURE_DIMS)
        self.fusion = fusion
        self.decoder = nn.Linear(LATENT_DIM, 3)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = [x1, x2]
        halves = [encoder(x).chunk(2, dim=-1) for encoder, x in zip(self.encoders, features)]
        mu = torch.stack([h[0] for h in halves])
        logvar = torch.stack([h[1] for h in halves])
        result = self.fusion(mu, logvar, features=features)
        point = result.mean if isinstance(result, gf.GaussianMixture) else result.mu
        return self.decoder(point), result.mu, result.logvar


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with random non-zero parameters (the credibility networks' last layer starts at zero,
    which would make every alpha uniform), in eval mode (the feature standardisers' running averages)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module.eval()


def make_model(kind: str, dtype: torch.dtype = torch.float32) -> EncodeFuseDecode:
    return randomised(EncodeFuseDecode(LAYERS[kind]()).to(dtype))


def features(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """One batch of the two modalities' features, [batch, 5] and [batch, 7]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, dim, generator=g, dtype=dtype) for dim in FEATURE_DIMS)
