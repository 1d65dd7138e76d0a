"""Drop-in fusion layers with one call form:
``fusion(mu, logvar, mask=None, features=None, return_alpha=False)``.

Swapping ``PoE`` <-> ``GPoE`` <-> ``MoE`` changes one line. PoE and MoE ignore ``features``;
GPoE feeds them, with the mask, to its credibility network (see ``gpoe_fusion.credibility``).
``return_alpha=True`` adds each expert's weight [M, *batch, D] (0 when masked): GPoE's
credibility alpha, PoE's implicit weights (shares of the joint precision), MoE's mixture weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import functional as F
from ._validation import as_experts
from .credibility import GlobalCredibility, make_credibility
from .distributions import Gaussian, GaussianMixture

__all__ = ["GPoE", "MoE", "PoE"]


class PoE(nn.Module):
    """Product of experts. mu, logvar: [M, *batch, D] (or M tensors [*batch, D]) -> Gaussian [*batch, D],
    or ``(Gaussian, weights)`` with ``return_alpha``."""

    def __init__(self, prior_expert: bool = False, backend: str = "auto"):
        super().__init__()
        self.prior_expert = prior_expert
        self.backend = backend

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_alpha: bool = False):
        return F.poe(mu, logvar, mask, self.prior_expert, backend=self.backend, return_alpha=return_alpha)

    def extra_repr(self) -> str:
        return f"prior_expert={self.prior_expert}, backend={self.backend!r}"


class MoE(nn.Module):
    """Uniform mixture of the present experts -> GaussianMixture (train with its stratified rsample),
    or ``(GaussianMixture, weights)`` with ``return_alpha``."""

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_alpha: bool = False):
        return F.moe(mu, logvar, mask, return_alpha=return_alpha)


class GPoE(nn.Module):
    """Generalized product of experts with learned, input-dependent, per-dimension credibility.

    num_experts: M; latent_dim: D; feature_dims: the per-modality feature sizes F_i that the
    credibility network reads (not needed for ``credibility="global"``).
    credibility: "joint" (one MLP over all features, paper Fig. 2), "independent" (one MLP per
    modality) or "global" (learned [M, D] logits, input-independent); hidden: MLP widths.
    prior_expert: multiply in N(0, I) with weight 1, outside the softmax over modalities.

    ``forward(mu, logvar, mask, features, return_alpha=False)`` -> Gaussian [*batch, D], or
    ``(Gaussian, alpha)`` with alpha [M, *batch, D] (zero for masked experts) when asked, so you
    can plot which modality the model trusts; alpha comes from the same fused pass as the joint.
    The credibility network sees the mask: a missing modality's features influence nothing.
    """

    def __init__(self, num_experts: int, latent_dim: int, feature_dims: Sequence[int] | None = None,
                 credibility: str = "joint", hidden: Sequence[int] = (256,), prior_expert: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.latent_dim = latent_dim
        self.prior_expert = prior_expert
        self.backend = backend
        self.credibility = make_credibility(credibility, num_experts, latent_dim, feature_dims, hidden)

    def logits(self, mu: Tensor, features: Sequence[Tensor] | None, mask: Tensor | None = None) -> Tensor:
        """Credibility logits broadcastable to mu's [M, *batch, D]; mask: bool [M, *batch] or None."""
        if isinstance(self.credibility, GlobalCredibility):
            return self.credibility(batch_ndim=mu.dim() - 2)
        return self.credibility(features, mask=mask)

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_alpha: bool = False):
        mu, logvar = as_experts(mu, logvar)
        if mu.shape[0] != self.num_experts:
            raise ValueError(f"mu: expected {self.num_experts} experts, got {mu.shape[0]}")
        logits = self.logits(mu, features, mask)
        return F.gpoe(mu, logvar, logits, mask, self.prior_expert, backend=self.backend, return_alpha=return_alpha)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, latent_dim={self.latent_dim}, prior_expert={self.prior_expert}, backend={self.backend!r}"
