"""The fusion layers the pipelines compare, and the KL term each one's objective takes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

import gpoe_fusion as gf

from .options import FUSIONS

__all__ = ["make_fusion", "mixture_kl"]


def make_fusion(name: str, latent_dim: int, feature_dims: Sequence[int], credibility: str = "joint") -> nn.Module:
    """The fusion layer named ``name``; everything around it stays the same (paper Section 5.3)."""
    if name == "poe":
        return gf.PoE()
    if name == "moe":
        return gf.MoE()
    if name == "mopoe":
        return gf.MoPoE()
    if name == "gpoe":
        return gf.GPoE(len(feature_dims), latent_dim, feature_dims, credibility=credibility, hidden=(128,))
    raise ValueError(f"fusion: expected one of {FUSIONS}, got {name!r}")


def mixture_kl(fusion: str) -> str:
    """The KL term of a mixture fusion's objective: MoPoE's own, the mixture-weighted KL of its subset
    posteriors; MMVAE's estimate of the mixture's KL for MoE (``CrossModalObjective``'s ``kl``)."""
    return "components" if fusion == "mopoe" else "mixture"
