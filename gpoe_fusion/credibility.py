"""Credibility networks: per-modality, per-dimension logits for gPoE's alpha (paper Eq. 7-9, Fig. 2).

Each maps modality features (M tensors [*batch, F_i]) and the modality mask (bool [M, *batch],
True = present; None = all present) to logits [M, *batch, D]; ``GPoE`` turns them into alpha with
a softmax over the present experts. The MLPs standardise each modality's features over the batch,
and their last layer starts at zero, so training starts from uniform alpha (gPoE = PoE with the
joint variance scaled by M) and learns to move away.

A missing modality must not leak: its features are whatever the encoder made of a placeholder
(or NaN), and if they reached the batch statistics or the joint MLP they would move the logits of
every other sample and of the sample's other modalities. So the networks read the mask: a masked
modality's features count in no statistic and enter the MLP as zeros after standardisation (an
average input), selected with ``torch.where`` so NaN or inf cannot get through, and the joint
network is also told which modalities are present, so it can learn to trust the others more when
one is missing.

Under data parallelism each process standardises over its own part of the batch unless
``sync_feature_statistics(model)`` makes every standardiser use the statistics of the whole batch,
summed over the processes (see ``FeatureStandardizer``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._validation import check_mask
from .distributed import all_reduce_sum

__all__ = ["CREDIBILITIES", "EntropyCredibility", "FeatureStandardizer", "GlobalCredibility", "IndependentCredibility",
           "JointCredibility", "credibility_logits", "make_credibility", "sync_feature_statistics"]


class FeatureStandardizer(nn.Module):
    """Per-feature standardisation over the present rows of the batch (running averages in eval mode).

    Encoder features share a large common component across samples (post-ReLU trunks); without
    this, the credibility network sees mostly that component and learns one alpha for everyone.
    Standardised, it sees how a sample differs from the others, which is what credibility is
    about. x: [*batch, F], present: bool [*batch] or None (all present) -> [*batch, F], zero in
    absent rows. Only present rows enter the statistics; a training batch with fewer than two
    present rows (or of one row) uses the running averages and leaves them as they are.

    sync (attribute, default False; see ``sync_feature_statistics``): in training, take the
    statistics over the batch of every process of ``process_group`` (None: the default group),
    exactly as one process would over the concatenated batch: the present-row count and the sum
    are summed over the processes first, for the global mean, then the squared deviations from it,
    with a differentiable all-reduce (gradients reach every process's rows). Every process must
    then run each training forward (collectives in step); evaluation needs none.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.sync = False
        self.process_group: dist.ProcessGroup | None = None
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor, present: Tensor | None = None) -> Tensor:
        # Statistics in float32 at least: bfloat16 features (GPU autocast) would round the running
        # mean of features near 10 to steps of 1/16, and every evaluation-time input with it.
        flat = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        keep = (torch.ones(flat.shape[0], 1, dtype=torch.bool, device=x.device) if present is None
                else present.reshape(-1, 1))
        # where, not a product: absent rows may hold NaN or inf, and 0 * inf is NaN (also in backward).
        clean = torch.where(keep, flat, 0.0)
        running_mean = self.running_mean.to(flat.dtype)
        running_var = self.running_var.to(flat.dtype)
        mean, var = running_mean, running_var
        # Synchronised, a process's one row is part of a larger batch: only the global count decides.
        if self.training and (self.sync or flat.shape[0] > 1):
            count = keep.sum(0, dtype=flat.dtype)  # [1]
            total = clean.sum(0)  # [F]
            if self.sync:
                summed = all_reduce_sum(torch.cat([count, total]), self.process_group)
                count, total = summed[:1], summed[1:]
            batch_mean = total / count.clamp_min(1)
            sq_dev = torch.where(keep, clean - batch_mean, 0.0).square().sum(0)
            if self.sync:
                sq_dev = all_reduce_sum(sq_dev, self.process_group)
            # A tensor condition rather than `if`: no host sync on CUDA, one graph under torch.compile.
            enough = count >= 2
            mean = torch.where(enough, batch_mean, running_mean)
            var = torch.where(enough, sq_dev / count.clamp_min(1), running_var)
            with torch.no_grad():
                unbiased = sq_dev / (count - 1).clamp_min(1)
                self.running_mean.copy_(torch.where(enough, running_mean.lerp(batch_mean, self.momentum), running_mean))
                self.running_var.copy_(torch.where(enough, running_var.lerp(unbiased, self.momentum), running_var))
        out = torch.where(keep, (clean - mean) * torch.rsqrt(var + self.eps), 0.0)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        sync = ", sync" if self.sync else ""
        return f"{self.running_mean.shape[0]}, momentum={self.momentum}, eps={self.eps}{sync}"


def sync_feature_statistics(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> int:
    """Make every ``FeatureStandardizer`` in ``module`` (the credibility networks' standardisation)
    take its training statistics over the batch of all processes of ``process_group`` (None: the
    default group), so that a data-parallel run standardises as one process with the whole batch
    does. Needs an initialised process group while training. Returns the number of standardisers set.
    """
    norms = [m for m in module.modules() if isinstance(m, FeatureStandardizer)]
    for norm in norms:
        norm.sync = True
        norm.process_group = process_group
    return len(norms)


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
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


def _present(mask: Tensor | None, features: Sequence[Tensor]) -> Tensor:
    """mask: bool [M, *batch] or None, checked against the features -> bool [M, *batch] (None: all present)."""
    shape = (len(features),) + tuple(features[0].shape[:-1])
    mask = check_mask(mask, shape, features[0].device, against="features")
    return torch.ones(shape, dtype=torch.bool, device=features[0].device) if mask is None else mask


class JointCredibility(nn.Module):
    """One MLP over the concatenated features of all modalities (paper Fig. 2): it can judge a
    modality against the others. Each modality's features are standardised on their own present
    rows, and the MLP also reads the mask, so it can learn what to trust when a modality is missing.
    features: M tensors [*batch, F_i], mask: bool [M, *batch] or None -> logits [M, *batch, D]."""

    def __init__(self, feature_dims: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.feature_dims = tuple(feature_dims)
        self.latent_dim = latent_dim
        self.norms = nn.ModuleList(FeatureStandardizer(dim) for dim in self.feature_dims)
        num = len(self.feature_dims)
        self.net = _mlp(sum(self.feature_dims) + num, hidden, num * latent_dim)

    def forward(self, features: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        features = _check_features(features, self.feature_dims)
        mask = _present(mask, features)
        blocks = [norm(f, present) for norm, f, present in zip(self.norms, features, mask)]
        dtype = blocks[0].dtype
        out = self.net(torch.cat(blocks + [mask.movedim(0, -1).to(dtype)], dim=-1))
        out = out.unflatten(-1, (len(self.feature_dims), self.latent_dim))
        return out.movedim(-2, 0)


class IndependentCredibility(nn.Module):
    """One MLP per modality, each seeing only its own features (standardised on its present rows):
    a modality is judged on its own evidence.
    features: M tensors [*batch, F_i], mask: bool [M, *batch] or None -> logits [M, *batch, D]."""

    def __init__(self, feature_dims: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.feature_dims = tuple(feature_dims)
        self.latent_dim = latent_dim
        self.norms = nn.ModuleList(FeatureStandardizer(dim) for dim in self.feature_dims)
        self.nets = nn.ModuleList(_mlp(dim, hidden, latent_dim) for dim in self.feature_dims)

    def forward(self, features: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        features = _check_features(features, self.feature_dims)
        mask = _present(mask, features)
        return torch.stack([net(norm(f, present))
                            for net, norm, f, present in zip(self.nets, self.norms, features, mask)])


class GlobalCredibility(nn.Module):
    """Learned input-independent logits [M, D] (no features needed): which modality to trust in
    which latent dimension, the same for every sample. Returns logits [M, 1, ..., 1, D] with
    ``batch_ndim`` ones. ``mask`` is accepted for a uniform call form and ignored: the softmax over
    present experts already drops the missing ones, and nothing here reads their features."""

    def __init__(self, num_experts: int, latent_dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_experts, latent_dim))

    def forward(self, features: Sequence[Tensor] | None = None, batch_ndim: int = 1,
                mask: Tensor | None = None) -> Tensor:
        m, d = self.logits.shape
        return self.logits.view((m,) + (1,) * batch_ndim + (d,))


class EntropyCredibility(nn.Module):
    """Credibility from the experts themselves (the original gPoE weighting, Cao & Fleet 2014): an
    expert is as credible, per dimension, as the entropy it removes from the N(0, I) prior,
    h_i = max(-logvar_i / 2, 0) nats; alpha_i = h_i^tau / sum over present experts j of h_j^tau
    (uniform where every h_j is 0). No network: it works with frozen encoders and is read directly
    off the posteriors. learn_temperature: tau is a learned parameter (initialised at 1; kept
    positive as exp of a log-temperature), else tau = 1. network: an optional credibility network
    (e.g. ``JointCredibility``) whose logits are added, so learned evidence can correct the entropy.

    forward(logvar [M, *batch, D], mask bool [M, *batch] or None, features) -> logits [M, *batch, D],
    tau * log(h) with h floored at the dtype's smallest normal number (so h = 0 gives a finite
    logit whose weight vanishes next to any positive h).
    """

    def __init__(self, learn_temperature: bool = False, network: nn.Module | None = None):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(())) if learn_temperature else None
        self.network = network

    def forward(self, logvar: Tensor, mask: Tensor | None = None,
                features: Sequence[Tensor] | None = None) -> Tensor:
        if mask is not None:
            # A missing expert's log-variance may be anything (NaN too); its logit is never used,
            # but a NaN here would still reach its gradient.
            logvar = torch.where(mask.unsqueeze(-1), logvar, 0.0)
        removed = (-0.5 * logvar).clamp_min(torch.finfo(logvar.dtype).tiny)
        logits = torch.log(removed)
        if self.log_temperature is not None:
            logits = logits * self.log_temperature.exp()
        if self.network is not None:
            logits = logits + self.network(features, mask=mask)
        return logits

    def extra_repr(self) -> str:
        return f"learn_temperature={self.log_temperature is not None}"


# The credibility kinds GPoE and MoPoE accept.
CREDIBILITIES = ("joint", "independent", "global", "entropy", "entropy+joint")


def make_credibility(kind: str, num_experts: int, latent_dim: int, feature_dims: Sequence[int] | None,
                     hidden: Sequence[int], learn_temperature: bool = False) -> nn.Module:
    """The credibility module named by ``kind`` (one of ``CREDIBILITIES``)."""
    if kind not in CREDIBILITIES:
        raise ValueError(f"credibility: expected one of {CREDIBILITIES}, got {kind!r}")
    if learn_temperature and not kind.startswith("entropy"):
        raise ValueError(f"learn_temperature: only entropy credibility has a temperature, not {kind!r}")
    if kind == "global":
        return GlobalCredibility(num_experts, latent_dim)
    if kind == "entropy":
        return EntropyCredibility(learn_temperature)
    if feature_dims is None or len(feature_dims) != num_experts:
        raise ValueError(f"feature_dims: credibility={kind!r} needs one feature size per expert "
                         f"({num_experts}), got {feature_dims!r}")
    if kind == "entropy+joint":
        return EntropyCredibility(learn_temperature, JointCredibility(feature_dims, latent_dim, hidden))
    cls = JointCredibility if kind == "joint" else IndependentCredibility
    return cls(feature_dims, latent_dim, hidden)


def credibility_logits(credibility: nn.Module, logvar: Tensor, features: Sequence[Tensor] | None,
                       mask: Tensor | None) -> Tensor:
    """Logits broadcastable to logvar's [M, *batch, D] from any of the credibility modules."""
    if isinstance(credibility, GlobalCredibility):
        return credibility(batch_ndim=logvar.dim() - 2)
    if isinstance(credibility, EntropyCredibility):
        return credibility(logvar, mask=mask, features=features)
    return credibility(features, mask=mask)
