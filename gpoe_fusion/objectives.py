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
    KL_mix = sum_i w_i * E_{z_i ~ q_i}[ log q_mix(z_i) - log p(z_i) ]     (kl="mixture", MoE's default)
           or sum_i w_i * KL(q_i || N(0, I))                                (kl="components", its upper bound)

with w_i = 1 / (number of present experts). MoPoE (Sutter et al. 2021) is the same estimator over
its mixture, whose components are the products of every non-empty subset of the modalities:
reconstruction from stratified draws of every present component, weighted by the uniform mixture
weights, and with kl="components" (MoPoE's default) exactly MoPoE's regulariser, the
mixture-weighted KL of the subset posteriors to the prior (kl="mixture" estimates the mixture's own
KL instead). Every term is
averaged over the batch; a sample whose modality i is missing (mask False) contributes nothing to
the terms of z_i (for MoPoE: of every subset that contains i).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._reference import subset_members
from .distributions import Gaussian, GaussianMixture, NoiseSource, log_standard_normal

__all__ = ["CrossModalObjective", "ObjectiveOutput"]

Likelihood = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ObjectiveOutput:
    """loss: scalar to minimise; terms: its named parts (detached scalars, for logging);
    joint: the fused posterior; weights: with ``return_weights``, each encoded modality's weight
    [M, B, D] in the fusion (see ``CrossModalObjective.fusion_weights``), else None."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    joint: Gaussian | GaussianMixture | None = None
    weights: Tensor | None = None

    @property
    def alpha(self) -> Tensor | None:
        """Deprecated name of ``weights``."""
        warnings.warn("ObjectiveOutput.alpha is deprecated, use ObjectiveOutput.weights", DeprecationWarning,
                      stacklevel=2)
        return self.weights


def _modality_weights(joint: Gaussian | GaussianMixture, weights: Tensor) -> Tensor:
    """A fusion's ``return_weights`` output as each expert's weight [M, *batch, D]. MoPoE's weights are
    its S components' [S, *batch, D]: a modality's is the mixture weight of the components holding it,
    renormalised over the modalities (for M = 2: 2/3 each of the three subsets' 1/3, so 1/2 each)."""
    members = getattr(joint, "subsets", None)
    if members is None:
        return weights
    shares = torch.einsum("sm,s...->m...", members.to(weights.dtype), weights)
    return shares / shares.sum(0, keepdim=True)


class CrossModalObjective(nn.Module):
    """Cross-modal VAE objective around one fusion layer.

    fusion: ``PoE``, ``GPoE``, ``MoE`` or ``MoPoE`` (anything with their call form).
    decoders: decoded modality name -> module mapping z [B', D] to a prediction [B', ...].
    likelihoods: decoded modality name -> ``nll(prediction, target) -> [B']`` (see
    ``gpoe_fusion.likelihoods``). weights: per decoded modality lambda_k (default 1).
    beta: KL weight. kl: the MoE and MoPoE regulariser, "mixture" or "components" (see the module doc);
    None, the default: each mixture's own, "components" for MoPoE and "mixture" for MoE.
    num_samples: MoE's k, the draws from each expert.
    noise: where the reparameterised draws take their standard-normal noise from (also settable
    later as the attribute ``noise``): ``noise(shape, dtype, device) -> [*shape]``, called with shape
    [..., B, D], the batch on the second-to-last axis; default None, ``torch.randn`` on the global
    RNG. Data parallelism uses it so that each sample gets the noise it would get in one process
    with the whole batch: every rank draws for the global batch and keeps its own rows.
    """

    def __init__(self, fusion: nn.Module, decoders: Mapping[str, nn.Module], likelihoods: Mapping[str, Likelihood],
                 beta: float = 1.0, weights: Mapping[str, float] | None = None, kl: str | None = None, num_samples: int = 1,
                 noise: NoiseSource | None = None):
        super().__init__()
        if set(decoders) != set(likelihoods):
            raise ValueError(f"likelihoods: keys {sorted(likelihoods)} must match decoders keys {sorted(decoders)}")
        weights = dict(weights or {})
        unknown = set(weights) - set(decoders)
        if unknown:
            raise ValueError(f"weights: {sorted(unknown)} are not decoded modalities {sorted(decoders)}")
        if kl not in (None, "mixture", "components"):
            raise ValueError(f"kl: expected None, 'mixture' or 'components', got {kl!r}")
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
                mask: Tensor | None = None, features: Mapping[str, Tensor] | None = None,
                return_weights: bool = False) -> ObjectiveOutput:
        """posteriors: encoded modality name -> (mu, logvar) [B, D], in expert order;
        targets: decoded modality name -> target [B, ...]; mask: bool [M, B] (True = modality
        present) or None; features: encoded modality name -> [B, F] for GPoE's credibility network.
        return_weights: also each modality's weight in the fusion (``ObjectiveOutput.weights``); asked
        of the fusion only then, as it is an extra [M, B, D] output that nothing else needs.
        """
        names, mu, logvar, feats = self._experts(posteriors, features)
        missing = set(self.decoders) - set(targets)
        if missing:
            raise ValueError(f"targets: missing {sorted(missing)} (one target per decoded modality)")
        if return_weights:
            joint, weights = self.fusion(mu, logvar, mask, feats, return_weights=True)
            weights = _modality_weights(joint, weights)
        else:
            joint, weights = self.fusion(mu, logvar, mask, feats), None
        if isinstance(joint, GaussianMixture):
            return self._mixture_objective(names, joint, targets, weights)
        return self._product_objective(names, joint, mu, logvar, mask, targets, weights)

    @torch.no_grad()
    def fusion_weights(self, posteriors: Mapping[str, Gaussian | tuple[Tensor, Tensor]], mask: Tensor | None = None,
                       features: Mapping[str, Tensor] | None = None) -> Tensor:
        """Each encoded modality's weight [M, B, D] in the fusion of ``posteriors`` (arguments as
        ``forward`` takes them), summing to 1 over the present modalities: gPoE's alpha, PoE's share of
        the joint precision, MoE's mixture weight; for MoPoE the mixture weight of the subsets holding
        the modality, renormalised over the modalities. No gradient: for measuring the fusion."""
        _, mu, logvar, feats = self._experts(posteriors, features)
        joint, weights = self.fusion(mu, logvar, mask, feats, return_weights=True)
        return _modality_weights(joint, weights)

    def _experts(self, posteriors: Mapping[str, Gaussian | tuple[Tensor, Tensor]],
                 features: Mapping[str, Tensor] | None) -> tuple[list[str], Tensor, Tensor, list[Tensor] | None]:
        """The encoded modalities' names, their stacked mu and logvar [M, B, D], and features in that order."""
        names = list(posteriors)
        if not names:
            raise ValueError("posteriors: expected at least one encoded modality")
        mu = torch.stack([posteriors[n][0] for n in names])
        logvar = torch.stack([posteriors[n][1] for n in names])
        if features is None:
            return names, mu, logvar, None
        absent = set(names) - set(features)
        if absent:
            raise ValueError(f"features: missing {sorted(absent)} (one per encoded modality)")
        return names, mu, logvar, [features[n] for n in names]

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
                           targets: Mapping[str, Tensor], weights: Tensor | None) -> ObjectiveOutput:
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
        return ObjectiveOutput(loss, terms, joint, weights)

    def _mixture_objective(self, names, joint: GaussianMixture, targets: Mapping[str, Tensor],
                           weights: Tensor | None) -> ObjectiveOutput:
        m, batch = joint.num_components, joint.mu.shape[1]
        k = self.num_samples
        z = joint.rsample(k, noise=self.noise)  # [K, k, B, D]
        mixture = joint.log_weights.exp().to(z.dtype)  # [K, B], 0 for missing components
        sample_weights = mixture.unsqueeze(1).expand(m, k, batch).reshape(m * k, batch) / k
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
        if (self.kl or ("components" if joint.subsets is not None else "mixture")) == "mixture":
            log_q = joint.log_prob(z)  # [K, k, B]
            log_p = log_standard_normal(z)
            kl = ((log_q - log_p) * mixture.unsqueeze(1)).sum(0).mean(0).sum() / max(batch, 1)
        else:
            kl = (joint.components.kl_standard_normal() * mixture).sum() / max(batch, 1)
        terms["kl/mixture"] = kl.detach()
        loss = loss + self.beta * kl
        terms["loss"] = loss.detach()
        return ObjectiveOutput(loss, terms, joint, weights)
