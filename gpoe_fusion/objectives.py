"""The cross-modal objective of the paper (Eq. 12-15), MMVAE's MoE objective (Eq. 16) and MoPoE's.

Modalities play two roles. *Encoded* modalities (the input x and the auxiliary m_1..m_N) each
give a unimodal posterior q(z | m) = N(mu, exp(logvar)) [B, D]; the fusion combines them into the
joint. *Decoded* modalities (the target y and the auxiliary m_1..m_N) each have a decoder and a
likelihood. For PoE and gPoE (Eq. 12-15):

    L = sum_{z in {joint, z_x, z_m1..z_mN}} sum_{k decoded} lambda_k * NLL_k(decoder_k(z), target_k)
        + beta * sum_{i encoded} KL(q_i || N(0, I))

For MoE the joint is the uniform mixture of the unimodal posteriors, trained with stratified
samples (k draws from every expert, MMVAE's estimator of Eq. 16):

    L = sum_i w_i * [ sum_k lambda_k * NLL_k(decoder_k(z_i), target_k) ] + beta * KL_mix,
    KL_mix = sum_i w_i * E_{z_i ~ q_i}[ log q_mix(z_i) - log p(z_i) ]     (kl="mixture", default)
           or sum_i w_i * KL(q_i || N(0, I))                                (kl="components", its upper bound)

with w_i = 1 / (number of present experts). MoPoE (Sutter et al. 2021) is the same estimator over
its mixture, whose components are the products of every non-empty subset of the modalities:
reconstruction from stratified draws of every present component, weighted by the uniform mixture
weights, and with kl="components" exactly MoPoE's regulariser, the mixture-weighted KL of the
subset posteriors to the prior (kl="mixture" estimates the mixture's own KL instead). Every term is
averaged over the batch; a sample whose modality i is missing (mask False) contributes nothing to
the terms of z_i (for MoPoE: of every subset that contains i).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._reference import subset_members
from .distributions import Gaussian, GaussianMixture, NoiseSource

__all__ = ["CrossModalObjective", "ObjectiveOutput"]

Likelihood = Callable[[Tensor, Tensor], Tensor]
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class ObjectiveOutput:
    """loss: scalar to minimise; terms: its named parts (detached scalars, for logging);
    joint: the fused posterior; alpha: the experts' weights [M, B, D] from the fusion's
    ``return_alpha`` (gPoE's credibility, PoE's precision shares, MoE's mixture weights)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    joint: Gaussian | GaussianMixture | None = None
    alpha: Tensor | None = None


class CrossModalObjective(nn.Module):
    """Cross-modal VAE objective around one fusion layer.

    fusion: ``PoE``, ``GPoE``, ``MoE`` or ``MoPoE`` (anything with their call form).
    decoders: decoded modality name -> module mapping z [B', D] to a prediction [B', ...].
    likelihoods: decoded modality name -> ``nll(prediction, target) -> [B']`` (see
    ``gpoe_fusion.likelihoods``). weights: per decoded modality lambda_k (default 1).
    beta: KL weight. kl: the MoE and MoPoE regulariser, "mixture" or "components" (MoPoE's own; see the module doc).
    num_samples: MoE's k, the draws from each expert.
    noise: where the reparameterised draws take their standard-normal noise from (also settable
    later as the attribute ``noise``): ``noise(shape, dtype, device) -> [*shape]``, called with shape
    [..., B, D], the batch on the second-to-last axis; default None, ``torch.randn`` on the global
    RNG. Data parallelism uses it so that each sample gets the noise it would get in one process
    with the whole batch: every rank draws for the global batch and keeps its own rows.
    """

    def __init__(self, fusion: nn.Module, decoders: Mapping[str, nn.Module], likelihoods: Mapping[str, Likelihood],
                 beta: float = 1.0, weights: Mapping[str, float] | None = None, kl: str = "mixture", num_samples: int = 1,
                 noise: NoiseSource | None = None):
        super().__init__()
        if set(decoders) != set(likelihoods):
            raise ValueError(f"likelihoods: keys {sorted(likelihoods)} must match decoders keys {sorted(decoders)}")
        weights = dict(weights or {})
        unknown = set(weights) - set(decoders)
        if unknown:
            raise ValueError(f"weights: {sorted(unknown)} are not decoded modalities {sorted(decoders)}")
        if kl not in ("mixture", "components"):
            raise ValueError(f"kl: expected 'mixture' or 'components', got {kl!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        self.fusion = fusion
        self.decoders = nn.ModuleDict(decoders)
        self.likelihoods = dict(likelihoods)
        self.weights = {name: float(weights.get(name, 1.0)) for name in decoders}
        self.beta = beta
        self.kl = kl
        self.num_samples = num_samples
        self.noise = noise

    def forward(self, posteriors: Mapping[str, Gaussian | tuple[Tensor, Tensor]], targets: Mapping[str, Tensor],
                mask: Tensor | None = None, features: Mapping[str, Tensor] | None = None) -> ObjectiveOutput:
        """posteriors: encoded modality name -> (mu, logvar) [B, D], in expert order;
        targets: decoded modality name -> target [B, ...]; mask: bool [M, B] (True = modality
        present) or None; features: encoded modality name -> [B, F] for GPoE's credibility network.
        """
        names = list(posteriors)
        if not names:
            raise ValueError("posteriors: expected at least one encoded modality")
        missing = set(self.decoders) - set(targets)
        if missing:
            raise ValueError(f"targets: missing {sorted(missing)} (one target per decoded modality)")
        mu = torch.stack([posteriors[n][0] for n in names])
        logvar = torch.stack([posteriors[n][1] for n in names])
        feats = None
        if features is not None:
            absent = set(names) - set(features)
            if absent:
                raise ValueError(f"features: missing {sorted(absent)} (one per encoded modality)")
            feats = [features[n] for n in names]

        joint, alpha = self.fusion(mu, logvar, mask, feats, return_alpha=True)
        if isinstance(joint, GaussianMixture):
            return self._mixture_objective(names, joint, targets, alpha)
        return self._product_objective(names, joint, mu, logvar, mask, targets, alpha)

    def _reconstruction(self, latents: Tensor, sample_weights: Tensor, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """latents [L, B, D] decoded by every decoder in one batched pass each.
        Returns decoded name -> [L]: the batch mean of sample_weights [L, B] * NLL."""
        n_latents, batch = latents.shape[:2]
        flat = latents.reshape(n_latents * batch, latents.shape[-1])
        out = {}
        for name, decoder in self.decoders.items():
            target = targets[name]
            repeated = target.unsqueeze(0).expand((n_latents,) + tuple(target.shape)).reshape((-1,) + tuple(target.shape[1:]))
            nll = self.likelihoods[name](decoder(flat), repeated).reshape(n_latents, batch)
            out[name] = (nll * sample_weights).sum(1) / max(batch, 1)
        return out

    def _product_objective(self, names, joint: Gaussian, mu: Tensor, logvar: Tensor, mask: Tensor | None,
                           targets: Mapping[str, Tensor], alpha: Tensor | None) -> ObjectiveOutput:
        batch = mu.shape[1]
        if mask is not None:
            # A missing modality's values may be anything: sample it from N(0, I) and weight it 0.
            present = mask.unsqueeze(-1)
            mu, logvar = mu.masked_fill(~present, 0.0), logvar.masked_fill(~present, 0.0)
        unimodal = Gaussian(mu, logvar)
        latents = torch.cat([joint.rsample(noise=self.noise).unsqueeze(0),
                             unimodal.rsample(noise=self.noise)])  # [1 + M, B, D]
        presence = torch.ones((len(names), batch), dtype=latents.dtype, device=latents.device) if mask is None else mask.to(latents.dtype)
        sample_weights = torch.cat([presence.new_ones((1, batch)), presence])
        rec = self._reconstruction(latents, sample_weights, targets)

        terms: dict[str, Tensor] = {}
        loss = latents.new_zeros(())
        for decoded, per_latent in rec.items():
            for source, value in zip(["joint"] + names, per_latent):
                terms[f"rec/{source}->{decoded}"] = value.detach()
            loss = loss + self.weights[decoded] * per_latent.sum()
        kl = (unimodal.kl_standard_normal() * presence).sum(1) / max(batch, 1)  # [M]
        for name, value in zip(names, kl):
            terms[f"kl/{name}"] = value.detach()
        loss = loss + self.beta * kl.sum()
        terms["loss"] = loss.detach()
        return ObjectiveOutput(loss, terms, joint, alpha)

    def _mixture_objective(self, names, joint: GaussianMixture, targets: Mapping[str, Tensor],
                           alpha: Tensor) -> ObjectiveOutput:
        m, batch = joint.num_components, joint.mu.shape[1]
        k = self.num_samples
        z = joint.rsample(k, noise=self.noise)  # [K, k, B, D]
        weights = joint.log_weights.exp().to(z.dtype)  # [K, B], 0 for missing components
        sample_weights = weights.unsqueeze(1).expand(m, k, batch).reshape(m * k, batch) / k
        rec = self._reconstruction(z.reshape(m * k, batch, -1), sample_weights, targets)

        terms: dict[str, Tensor] = {}
        loss = z.new_zeros(())
        # MoPoE's components are named by their members (read from the shape: no device sync per step).
        sources = names if joint.subsets is None else ["+".join(names[i] for i in members)
                                                       for members in subset_members(joint.subsets.shape[1])]
        for decoded, per_draw in rec.items():
            per_component = per_draw.reshape(m, k).sum(1)
            for source, value in zip(sources, per_component):
                terms[f"rec/{source}->{decoded}"] = value.detach()
            loss = loss + self.weights[decoded] * per_component.sum()
        if self.kl == "mixture":
            log_q = joint.log_prob(z)  # [K, k, B]
            log_p = -0.5 * (z.float() ** 2 + _LOG_2PI).sum(-1)
            kl = ((log_q - log_p) * weights.unsqueeze(1)).sum(0).mean(0).sum() / max(batch, 1)
        else:
            kl = (joint.components.kl_standard_normal() * weights).sum() / max(batch, 1)
        terms["kl/mixture"] = kl.detach()
        loss = loss + self.beta * kl
        terms["loss"] = loss.detach()
        return ObjectiveOutput(loss, terms, joint, alpha)
