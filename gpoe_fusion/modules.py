"""Drop-in fusion layers with one call form:
``fusion(mu, logvar, mask=None, features=None, return_weights=False)``.

Swapping ``PoE`` <-> ``GPoE`` <-> ``MoE`` <-> ``MoPoE`` changes one line. PoE and MoE ignore
``features``; GPoE (and MoPoE with a credibility) feeds them, with the mask, to its credibility
network (see ``gpoe_fusion.credibility``). ``return_weights=True`` adds each expert's weight
[M, *batch, D] (0 when masked): GPoE's credibility alpha, PoE's implicit weights (shares of the
joint precision), MoE's mixture weights; MoPoE's are its S components' mixture weights.
``return_alpha`` is the deprecated alias of ``return_weights`` (the same output, a DeprecationWarning).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import functional as F
from ._validation import as_experts, weights_wanted
from .credibility import credibility_logits, make_credibility
from .distributions import Gaussian, GaussianMixture

__all__ = ["GPoE", "MoE", "MoPoE", "PoE"]

# How far up the stack a layer's caller is from the deprecation warning (past torch's Module.__call__).
_CALLER = 5


def _experts(mu: F.Experts, logvar: F.Experts, expected: int | None) -> tuple[Tensor, Tensor]:
    """Stacked, checked experts [M, *batch, D]; M must be ``expected`` when that is given."""
    mu, logvar = as_experts(mu, logvar)
    if expected is not None and mu.shape[0] != expected:
        raise ValueError(f"mu: expected {expected} experts, got {mu.shape[0]}")
    return mu, logvar


class PoE(nn.Module):
    """Product of experts. mu, logvar: [M, *batch, D] (or M tensors [*batch, D]) -> Gaussian [*batch, D],
    or ``(Gaussian, weights)`` with ``return_weights``."""

    def __init__(self, prior_expert: bool = False, backend: str = "auto"):
        super().__init__()
        self.prior_expert = prior_expert
        self.backend = backend

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_weights: bool = False,
                return_alpha: bool | None = None):
        wanted = weights_wanted(return_weights, return_alpha, _CALLER)
        return F.poe(mu, logvar, mask, self.prior_expert, backend=self.backend, return_weights=wanted)

    def extra_repr(self) -> str:
        return f"prior_expert={self.prior_expert}, backend={self.backend!r}"


class MoE(nn.Module):
    """Uniform mixture of the present experts -> GaussianMixture (train with its stratified rsample),
    or ``(GaussianMixture, weights)`` with ``return_weights``."""

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_weights: bool = False,
                return_alpha: bool | None = None):
        wanted = weights_wanted(return_weights, return_alpha, _CALLER)
        return F.moe(mu, logvar, mask, return_weights=wanted)


class GPoE(nn.Module):
    """Generalized product of experts with learned, input-dependent, per-dimension credibility.

    num_experts: M; latent_dim: D; feature_dims: the per-modality feature sizes F_i that the
    credibility network reads (not needed for ``credibility="global"`` or ``"entropy"``).
    credibility: "joint" (one MLP over all features, paper Fig. 2), "independent" (one MLP per
    modality), "global" (learned [M, D] logits, input-independent), "entropy" (no network: the
    entropy each expert removes from the prior, Cao & Fleet 2014) or "entropy+joint" (the entropy
    logits plus the joint network's); hidden: MLP widths; learn_temperature: a learned exponent on
    the entropy weights. prior_expert: multiply in N(0, I) with weight 1, outside the softmax.

    ``forward(mu, logvar, mask, features, return_weights=False)`` -> Gaussian [*batch, D], or
    ``(Gaussian, alpha)`` with alpha [M, *batch, D] (zero for masked experts) when asked, so you
    can plot which modality the model trusts; alpha comes from the same fused pass as the joint.
    The credibility network sees the mask: a missing modality's features influence nothing.
    """

    def __init__(self, num_experts: int, latent_dim: int, feature_dims: Sequence[int] | None = None,
                 credibility: str = "joint", hidden: Sequence[int] = (256,), prior_expert: bool = False,
                 backend: str = "auto", learn_temperature: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.latent_dim = latent_dim
        self.prior_expert = prior_expert
        self.backend = backend
        self.credibility = make_credibility(credibility, num_experts, latent_dim, feature_dims, hidden,
                                            learn_temperature)

    def logits(self, mu: Tensor, logvar: Tensor, features: Sequence[Tensor] | None,
               mask: Tensor | None = None) -> Tensor:
        """Credibility logits broadcastable to mu's [M, *batch, D]; mask: bool [M, *batch] or None."""
        return credibility_logits(self.credibility, logvar, features, mask)

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_weights: bool = False,
                return_alpha: bool | None = None):
        wanted = weights_wanted(return_weights, return_alpha, _CALLER)
        mu, logvar = _experts(mu, logvar, self.num_experts)
        logits = self.logits(mu, logvar, features, mask)
        return F.gpoe(mu, logvar, logits, mask, self.prior_expert, backend=self.backend, return_weights=wanted)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, latent_dim={self.latent_dim}, prior_expert={self.prior_expert}, backend={self.backend!r}"


class MoPoE(nn.Module):
    """Mixture of products of experts (Sutter et al. 2021): the uniform mixture over every
    non-empty subset of the experts of that subset's product -> GaussianMixture with S = 2^M - 1
    components (``mixture.subsets`` names their members), trained like MoE with its stratified
    ``rsample``.

    Without ``credibility`` each component is the PoE of its members. With one (any of GPoE's:
    then num_experts and latent_dim are needed, and feature_dims for the networks), each
    component is the gPoE of its members with alpha renormalised over them.
    """

    def __init__(self, num_experts: int | None = None, latent_dim: int | None = None,
                 feature_dims: Sequence[int] | None = None, credibility: str | None = None,
                 hidden: Sequence[int] = (256,), prior_expert: bool = False, backend: str = "auto",
                 learn_temperature: bool = False):
        super().__init__()
        self.prior_expert = prior_expert
        self.backend = backend
        self.num_experts = num_experts
        self.credibility = None
        if credibility is not None:
            if num_experts is None or latent_dim is None:
                raise ValueError(f"num_experts, latent_dim: credibility={credibility!r} needs both, got "
                                 f"{num_experts!r}, {latent_dim!r}")
            self.credibility = make_credibility(credibility, num_experts, latent_dim, feature_dims, hidden,
                                                learn_temperature)

    def forward(self, mu: F.Experts, logvar: F.Experts, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None, return_weights: bool = False,
                return_alpha: bool | None = None):
        wanted = weights_wanted(return_weights, return_alpha, _CALLER)
        mu, logvar = _experts(mu, logvar, self.num_experts)
        logits = None if self.credibility is None else credibility_logits(self.credibility, logvar, features, mask)
        return F.mopoe(mu, logvar, mask, logits, self.prior_expert, backend=self.backend, return_weights=wanted)

    def extra_repr(self) -> str:
        return f"prior_expert={self.prior_expert}, backend={self.backend!r}"
