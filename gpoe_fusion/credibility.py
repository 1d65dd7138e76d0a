"""Credibility networks: per-modality, per-dimension logits for gPoE's alpha (paper Eq. 7-9, Fig. 2).

Each maps modality features to logits [M, *batch, D]; ``GPoE`` turns them into alpha with a
softmax over the present experts. The MLPs standardise their input features over the batch, and
their last layer starts at zero, so training starts from uniform alpha (gPoE = PoE with the joint
variance scaled by M) and learns to move away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GlobalCredibility", "IndependentCredibility", "JointCredibility", "make_credibility"]


class FeatureStandardizer(nn.Module):
    """Per-feature standardisation over the batch (running averages in eval mode).

    Encoder features share a large common component across samples (post-ReLU trunks); without
    this, the credibility network sees mostly that component and learns one alpha for everyone.
    Standardised, it sees how a sample differs from the others, which is what credibility is
    about. x: [*batch, F] -> same shape. A training batch of one row uses the running averages.
    """

    def __init__(self, dim: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        use_batch = self.training and flat.shape[0] > 1
        out = F.batch_norm(flat, self.running_mean, self.running_var, training=use_batch,
                           momentum=self.momentum, eps=1e-5)
        return out.reshape(x.shape)


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [FeatureStandardizer(in_dim)]
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    last = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _check_features(features: Sequence[Tensor] | None, feature_dims: Sequence[int]) -> Sequence[Tensor]:
    if features is None or len(features) != len(feature_dims):
        got = "None" if features is None else f"{len(features)} tensors"
        raise ValueError(f"features: expected {len(feature_dims)} tensors [*batch, F_i] with F = {list(feature_dims)}, got {got}")
    for i, (f, dim) in enumerate(zip(features, feature_dims)):
        if f.shape[-1] != dim:
            raise ValueError(f"features[{i}]: expected last dimension {dim}, got shape {tuple(f.shape)}")
        if f.shape[:-1] != features[0].shape[:-1]:
            raise ValueError(f"features[{i}]: batch shape {tuple(f.shape[:-1])} differs from features[0] batch shape "
                             f"{tuple(features[0].shape[:-1])}")
    return features


class JointCredibility(nn.Module):
    """One MLP over the concatenated features of all modalities (paper Fig. 2): it can judge a
    modality against the others. features: M tensors [*batch, F_i] -> logits [M, *batch, D]."""

    def __init__(self, feature_dims: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.feature_dims = tuple(feature_dims)
        self.latent_dim = latent_dim
        self.net = _mlp(sum(self.feature_dims), hidden, len(self.feature_dims) * latent_dim)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        features = _check_features(features, self.feature_dims)
        out = self.net(torch.cat(list(features), dim=-1))
        out = out.unflatten(-1, (len(self.feature_dims), self.latent_dim))
        return out.movedim(-2, 0)


class IndependentCredibility(nn.Module):
    """One MLP per modality, each seeing only its own features: a modality is judged on its own
    evidence. features: M tensors [*batch, F_i] -> logits [M, *batch, D]."""

    def __init__(self, feature_dims: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.feature_dims = tuple(feature_dims)
        self.latent_dim = latent_dim
        self.nets = nn.ModuleList(_mlp(dim, hidden, latent_dim) for dim in self.feature_dims)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        features = _check_features(features, self.feature_dims)
        return torch.stack([net(f) for net, f in zip(self.nets, features)])


class GlobalCredibility(nn.Module):
    """Learned input-independent logits [M, D] (no features needed): which modality to trust in
    which latent dimension, the same for every sample. Returns logits [M, 1, ..., 1, D]."""

    def __init__(self, num_experts: int, latent_dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_experts, latent_dim))

    def forward(self, features: Sequence[Tensor] | None = None, batch_ndim: int = 1) -> Tensor:
        m, d = self.logits.shape
        return self.logits.view((m,) + (1,) * batch_ndim + (d,))


def make_credibility(kind: str, num_experts: int, latent_dim: int, feature_dims: Sequence[int] | None,
                     hidden: Sequence[int]) -> nn.Module:
    """The credibility network named by ``kind``: "joint", "independent" or "global"."""
    if kind == "global":
        return GlobalCredibility(num_experts, latent_dim)
    if kind not in ("joint", "independent"):
        raise ValueError(f"credibility: expected 'joint', 'independent' or 'global', got {kind!r}")
    if feature_dims is None or len(feature_dims) != num_experts:
        raise ValueError(f"feature_dims: credibility={kind!r} needs one feature size per expert "
                         f"({num_experts}), got {feature_dims!r}")
    cls = JointCredibility if kind == "joint" else IndependentCredibility
    return cls(feature_dims, latent_dim, hidden)
