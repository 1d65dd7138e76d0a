"""The fusion functions: check the arguments, then make one call into a backend.

Shapes (M experts, any batch shape, D latent dimensions):
    mu, logvar: [M, *batch, D], or a sequence of M tensors [*batch, D]
    logits:     broadcastable to [M, *batch, D]: [M, *batch, D] per sample and dimension,
                [M, 1, D] global per dimension, [M, *batch, 1] per sample
    mask:       bool [M, *batch], True = expert present; None = all present

``return_weights=True`` adds each expert's weight to the result (``return_alpha`` is its deprecated
alias: the same output, with a DeprecationWarning).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backend, _reference
from ._validation import (as_experts, check_logits, check_mask, check_values, has_empty_row, has_nan, validation_enabled,
                          weights_wanted)
from .distributions import Gaussian, GaussianMixture

__all__ = ["credibility_weights", "gpoe", "moe", "mopoe", "poe"]

Experts = Tensor | Sequence[Tensor]


def _fuse(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool, backend: str,
          validate: bool | None, return_weights: bool) -> Gaussian | tuple[Gaussian, Tensor]:
    """One backend call on checked experts, then the value checks (see ``gpoe_fusion._validation``)."""
    outputs = _backend.fuse(mu, logvar, logits, mask, prior_expert, backend, return_weights=return_weights)
    if validation_enabled(validate, mu.device) and has_nan(outputs[0]):
        check_values(mu, logvar, logits, mask, prior_expert)
    joint = Gaussian(outputs[0], outputs[1])
    return (joint, outputs[2]) if return_weights else joint


def _with_weights(mixture: GaussianMixture, return_weights: bool) -> GaussianMixture | tuple[GaussianMixture, Tensor]:
    """The mixture, and with ``return_weights`` its weights broadcast to the components' [K, *batch, D]
    like the other fusions' weights (an expanded view: one weight per sample)."""
    if not return_weights:
        return mixture
    weights = mixture.log_weights.exp().to(mixture.mu.dtype).unsqueeze(-1).expand(mixture.mu.shape)
    return mixture, weights


def poe(
    mu: Experts,
    logvar: Experts,
    mask: Tensor | None = None,
    prior_expert: bool = False,
    *,
    backend: str = "auto",
    validate: bool | None = None,
    return_weights: bool = False,
    return_alpha: bool | None = None,
) -> Gaussian | tuple[Gaussian, Tensor]:
    """Product of Gaussian experts: precision-weighted, computed exactly in log space.

    ``prior_expert=True`` multiplies in N(0, I) as one more expert (MVAE's choice), which also
    makes rows with every expert masked well defined (they return the prior).
    ``backend``: "auto" (the fused kernel when built and applicable), "kernel" or "torch".
    ``validate``: run the value checks (NaN, fully masked rows); None = the global setting
    (``gpoe_fusion.set_validation``). Returns a :class:`Gaussian` [*batch, D]; with
    ``return_weights`` also PoE's implicit weights [M, *batch, D]: each expert's share of the joint
    precision (the weight of its mean in the joint mean; 0 when masked; with the prior expert the
    prior holds the rest), differentiable.
    """
    mu, logvar = as_experts(mu, logvar)
    mask = check_mask(mask, mu.shape[:-1], mu.device)
    return _fuse(mu, logvar, None, mask, prior_expert, backend, validate, weights_wanted(return_weights, return_alpha))


def gpoe(
    mu: Experts,
    logvar: Experts,
    logits: Tensor | Sequence[Tensor],
    mask: Tensor | None = None,
    prior_expert: bool = False,
    *,
    backend: str = "auto",
    validate: bool | None = None,
    return_weights: bool = False,
    return_alpha: bool | None = None,
) -> Gaussian | tuple[Gaussian, Tensor]:
    """Generalized product of experts: expert i's density raised to alpha_i (paper Eq. 7-9).

    alpha = softmax of ``logits`` over the expert axis, masked experts excluded, so the present
    experts' alphas sum to 1 in every row and dimension. With uniform logits the joint mean is
    PoE's and the joint log-variance PoE's + log(M_present).

    ``prior_expert=True`` multiplies in N(0, I) with weight 1, outside the softmax: the alphas
    share out the modalities' credibility among themselves, while the prior is a fixed fallback
    (a row with every expert masked returns the prior). Equivalently: gPoE of the modalities,
    then PoE of that result with N(0, I). Returns a :class:`Gaussian` [*batch, D]; with
    ``return_weights`` also alpha [M, *batch, D] (0 for masked experts) from the same fused pass,
    differentiable.
    """
    mu, logvar = as_experts(mu, logvar)
    logits = check_logits(logits, mu)
    mask = check_mask(mask, mu.shape[:-1], mu.device)
    return _fuse(mu, logvar, logits, mask, prior_expert, backend, validate,
                 weights_wanted(return_weights, return_alpha))


def moe(mu: Experts, logvar: Experts, mask: Tensor | None = None, *, validate: bool | None = None,
        return_weights: bool = False, return_alpha: bool | None = None) -> GaussianMixture | tuple[GaussianMixture, Tensor]:
    """Mixture of experts with uniform weights over the present experts (MMVAE).

    Returns a :class:`GaussianMixture`; train it with its stratified ``rsample(k)`` as in
    ``gpoe_fusion.objectives``. With ``return_weights`` also the mixture weights, broadcast to
    [M, *batch, D] like the other fusions' weights (an expanded view: one weight per sample).
    """
    mu, logvar = as_experts(mu, logvar)
    mask = check_mask(mask, mu.shape[:-1], mu.device)
    if validation_enabled(validate, mu.device):
        # No fused output to reduce: one sum over the inputs (masked experts may hold NaN, in which
        # case the diagnosis runs and finds nothing) and the [M, *batch] mask.
        if has_nan(mu) or has_nan(logvar) or has_empty_row(mask):
            check_values(mu, logvar, None, mask, prior_expert=False)
    return _with_weights(GaussianMixture(mu, logvar, mask), weights_wanted(return_weights, return_alpha))


def mopoe(
    mu: Experts,
    logvar: Experts,
    mask: Tensor | None = None,
    logits: Tensor | Sequence[Tensor] | None = None,
    prior_expert: bool = False,
    *,
    backend: str = "auto",
    validate: bool | None = None,
    return_weights: bool = False,
    return_alpha: bool | None = None,
) -> GaussianMixture | tuple[GaussianMixture, Tensor]:
    """Mixture of products of experts (MoPoE, Sutter et al. 2021): the uniform mixture over every
    non-empty subset of the M <= 8 experts of that subset's product, in one fused pass.

    Component c (of S = 2^M - 1) is the product of the experts whose bit is set in c + 1:
    {0}, {1}, {0, 1}, {2}, {0, 2}, {1, 2}, {0, 1, 2}, ...; ``mixture.subsets`` is that bool [S, M].
    Without ``logits`` each component is ``poe`` of its members; with ``logits`` (broadcastable to
    [M, *batch, D]) it is ``gpoe`` of its members with alpha renormalised over them (the softmax of
    the members' logits). ``prior_expert`` multiplies N(0, I) into every component, as in
    ``poe``/``gpoe``. In each row a component is present (``mixture.mask`` [S, *batch]) when all its
    members are, and the weights are uniform over the present components, so ``rsample(k)`` and
    ``log_prob`` work as for ``moe``; an absent component holds zeros. Every row needs at least
    one present expert. ``return_weights`` adds the mixture weights broadcast to [S, *batch, D].
    """
    mu, logvar = as_experts(mu, logvar)
    if mu.shape[0] > 8:
        raise ValueError(f"mu: MoPoE enumerates the subsets of at most 8 experts (255 components), got M = "
                         f"{mu.shape[0]}")
    if logits is not None:
        logits = check_logits(logits, mu)
    mask = check_mask(mask, mu.shape[:-1], mu.device)
    joint_mu, joint_logvar = _backend.mopoe(mu, logvar, logits, mask, prior_expert, backend)
    if validation_enabled(validate, mu.device):
        # Rows without any expert have no component (and no NaN to show it), so the [M, *batch]
        # mask is checked too; a NaN among present experts reaches the present components' means.
        if has_empty_row(mask) or has_nan(joint_mu):
            check_values(mu, logvar, logits, mask, prior_expert=False)
    members = _reference.subset_masks(mu.shape[0], mu.device)
    present = None if mask is None else _reference.component_mask(mask, members)
    return _with_weights(GaussianMixture(joint_mu, joint_logvar, present, members),
                         weights_wanted(return_weights, return_alpha))


def credibility_weights(logits: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """alpha: softmax of ``logits`` over the expert axis with masked experts excluded (weight 0).

    logits: [M, *batch, D] (or broadcastable, see the module docstring); mask: bool [M, *batch].
    Returns alpha with the broadcast shape of logits and mask, in the logits' dtype.
    """
    if not isinstance(logits, Tensor):
        logits = torch.stack(list(logits))
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point dtype, got {logits.dtype}")
    shape = logits.shape
    if check_mask(mask, None, logits.device, against="logits") is not None:
        try:
            shape = torch.broadcast_shapes(logits.shape, mask.unsqueeze(-1).shape)
        except RuntimeError:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match logits shape {tuple(logits.shape)} "
                             "(expected [M, *batch] against logits [M, *batch, D])") from None
        mask = mask.expand(shape[:-1])
    dtype = _reference.compute_dtype(logits.dtype)
    return _reference.credibility(logits.to(dtype), mask, shape).exp().to(logits.dtype)
