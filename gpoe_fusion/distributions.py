"""Result types of the fusion: a diagonal Gaussian (PoE, gPoE) and a uniform Gaussian mixture (MoE).

Both keep log-variances, never variances, so everything they compute stays exact where the
variance itself would under- or overflow. 16-bit inputs are evaluated in float32 and the results
returned in the input dtype, as the fusion itself does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ._reference import compute_dtype

__all__ = ["Gaussian", "GaussianMixture", "NoiseSource", "log_standard_normal"]

_LOG_2PI = math.log(2.0 * math.pi)

# Where reparameterised draws take their standard-normal noise from: noise(shape, dtype, device) -> [*shape].
NoiseSource = Callable[[torch.Size, torch.dtype, torch.device], Tensor]


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last axis: [..., D] -> [...], computed in float32 for 16-bit z."""
    (z,) = _up(z)
    return -0.5 * (z**2 + _LOG_2PI).sum(-1)


def _up(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = compute_dtype(tensors[0].dtype)
    return tuple(t.to(dtype) for t in tensors)


def _shape(sample_shape: torch.Size | tuple[int, ...] | int) -> torch.Size:
    return torch.Size((sample_shape,) if isinstance(sample_shape, int) else sample_shape)


def _standard_normal(shape: torch.Size, like: Tensor, generator: torch.Generator | None,
                     noise: NoiseSource | None) -> Tensor:
    """Standard-normal draws [*shape] in like's dtype and device, from ``noise`` if given, else torch.randn."""
    if noise is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)
    if generator is not None:
        raise ValueError("generator: give a generator or a noise source, not both")
    eps = noise(shape, like.dtype, like.device)
    if eps.shape != shape:
        raise ValueError(f"noise: expected draws of shape {tuple(shape)}, got {tuple(eps.shape)}")
    return eps


class Gaussian:
    """Diagonal Gaussian ``N(mu, diag(exp(logvar)))`` over the last axis.

    mu, logvar: [*batch, D]. Unpacks as ``mu, logvar = gaussian`` so it drops into code that
    expects the usual pair. ``log_prob``, ``entropy`` and the KLs sum over D: [*batch].
    """

    __slots__ = ("mu", "logvar")

    def __init__(self, mu: Tensor, logvar: Tensor):
        if mu.shape != logvar.shape:
            raise ValueError(f"logvar: shape {tuple(logvar.shape)} differs from mu shape {tuple(mu.shape)}")
        self.mu = mu
        self.logvar = logvar

    def __iter__(self) -> Iterator[Tensor]:
        yield self.mu
        yield self.logvar

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Tensor:
        return (self.mu, self.logvar)[index]

    def __repr__(self) -> str:
        return f"Gaussian(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)}, dtype={self.mu.dtype})"

    @property
    def batch_shape(self) -> torch.Size:
        return self.mu.shape[:-1]

    @property
    def event_shape(self) -> torch.Size:
        return self.mu.shape[-1:]

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return torch.exp(self.logvar)

    @property
    def stddev(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] | int = (), generator: torch.Generator | None = None,
                noise: NoiseSource | None = None) -> Tensor:
        """Reparameterised draws: [*sample_shape, *batch, D], differentiable in mu and logvar.

        noise: where the standard-normal draws come from, ``noise(shape, dtype, device) -> [*shape]``
        with shape [*sample_shape, *batch, D]; default ``torch.randn`` (with ``generator``).
        """
        shape = _shape(sample_shape) + self.mu.shape
        mu, logvar = _up(self.mu, self.logvar)
        eps = _standard_normal(shape, mu, generator, noise)
        return (mu + torch.exp(0.5 * logvar) * eps).to(self.mu.dtype)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] | int = (), generator: torch.Generator | None = None) -> Tensor:
        """Draws without gradient: [*sample_shape, *batch, D]."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def log_prob(self, value: Tensor) -> Tensor:
        """log N(value; mu, var) summed over D. value: [*sample, *batch, D] -> [*sample, *batch]."""
        mu, logvar = _up(self.mu, self.logvar)
        z = value.to(mu.dtype)
        out = -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)
        return out.to(self.mu.dtype)

    def entropy(self) -> Tensor:
        """Differential entropy, [*batch]."""
        (logvar,) = _up(self.logvar)
        out = 0.5 * (logvar + 1.0 + _LOG_2PI).sum(-1)
        return out.to(self.mu.dtype)

    def kl_standard_normal(self) -> Tensor:
        """KL(self || N(0, I)) in closed form, [*batch]."""
        mu, logvar = _up(self.mu, self.logvar)
        # expm1(lv) - lv keeps exp(lv) - 1 - lv accurate near lv = 0, where the KL is tiny.
        out = 0.5 * (torch.expm1(logvar) - logvar + mu**2).sum(-1)
        return out.to(self.mu.dtype)

    def kl(self, other: Gaussian) -> Tensor:
        """KL(self || other) in closed form, [*batch] (shapes broadcast)."""
        mu, logvar, mu2, logvar2 = _up(self.mu, self.logvar, other.mu, other.logvar)
        diff = logvar - logvar2
        # Variance ratio and scaled squared distance from log-variances: no variance is formed.
        out = 0.5 * (torch.expm1(diff) - diff + (mu - mu2) ** 2 * torch.exp(-logvar2)).sum(-1)
        return out.to(self.mu.dtype)

    def to_torch(self) -> Independent:
        """The same distribution as ``Independent(Normal(mu, std), 1)``."""
        return Independent(Normal(self.mu, self.stddev), 1)

    def detach(self) -> Gaussian:
        return Gaussian(self.mu.detach(), self.logvar.detach())


class GaussianMixture:
    """Uniform mixture of the present diagonal Gaussian components (MoE, MoPoE).

    mu, logvar: [K, *batch, D]; mask: bool [K, *batch] (True = present) or None (all present).
    Each row's weights are 1 / (number of present components); masked components have weight 0.
    ``log_prob`` sums over D. subsets: for MoPoE, bool [K, M], the experts whose product each
    component is (None for MoE, whose components are the experts themselves).
    """

    __slots__ = ("mu", "logvar", "mask", "subsets")

    def __init__(self, mu: Tensor, logvar: Tensor, mask: Tensor | None = None, subsets: Tensor | None = None):
        if mu.shape != logvar.shape:
            raise ValueError(f"logvar: shape {tuple(logvar.shape)} differs from mu shape {tuple(mu.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(mu.shape[:-1]):
            raise ValueError(f"mask: expected shape {tuple(mu.shape[:-1])}, got {tuple(mask.shape)}")
        if subsets is not None and (subsets.dim() != 2 or subsets.shape[0] != mu.shape[0]):
            raise ValueError(f"subsets: expected shape [K = {mu.shape[0]}, M], got {tuple(subsets.shape)}")
        self.mu = mu
        self.logvar = logvar
        self.mask = mask
        self.subsets = subsets

    def __repr__(self) -> str:
        return (f"GaussianMixture(components={self.num_components}, batch_shape={tuple(self.batch_shape)}, "
                f"event_shape={tuple(self.event_shape)}, dtype={self.mu.dtype})")

    @property
    def num_components(self) -> int:
        return self.mu.shape[0]

    @property
    def batch_shape(self) -> torch.Size:
        return self.mu.shape[1:-1]

    @property
    def event_shape(self) -> torch.Size:
        return self.mu.shape[-1:]

    @property
    def components(self) -> Gaussian:
        """The components as one Gaussian with batch shape [K, *batch]."""
        return Gaussian(self.mu, self.logvar)

    @property
    def log_weights(self) -> Tensor:
        """log of the mixture weights, [M, *batch]: -log(present count), -inf where masked."""
        dtype = compute_dtype(self.mu.dtype)
        if self.mask is None:
            return torch.full(self.mu.shape[:-1], -math.log(self.num_components), dtype=dtype, device=self.mu.device)
        count = self.mask.sum(0, keepdim=True).to(dtype)
        return torch.where(self.mask, -torch.log(count), torch.full_like(count, float("-inf")))

    def _clean(self) -> tuple[Tensor, Tensor]:
        """mu, logvar in the compute dtype, with masked experts replaced by N(0, 1) so they stay finite."""
        mu, logvar = _up(self.mu, self.logvar)
        if self.mask is None:
            return mu, logvar
        present = self.mask.unsqueeze(-1)
        return mu.masked_fill(~present, 0.0), logvar.masked_fill(~present, 0.0)

    @property
    def mean(self) -> Tensor:
        """Mixture mean, [*batch, D]."""
        mu, _ = self._clean()
        w = self.log_weights.exp().unsqueeze(-1)
        return (w * mu).sum(0).to(self.mu.dtype)

    @property
    def variance(self) -> Tensor:
        """Mixture variance (law of total variance), [*batch, D]."""
        mu, logvar = self._clean()
        w = self.log_weights.exp().unsqueeze(-1)
        mean = (w * mu).sum(0)
        second = (w * (torch.exp(logvar) + (mu - mean) ** 2)).sum(0)
        return second.to(self.mu.dtype)

    def rsample(self, k: int = 1, generator: torch.Generator | None = None, noise: NoiseSource | None = None) -> Tensor:
        """Stratified reparameterised draws, k from EVERY component: [M, k, *batch, D].

        This is how MMVAE trains the MoE objective: each expert's draws are decoded and weighted
        by that expert's mixture weight. Draws of masked experts are returned too (from N(0, 1)
        in place of the masked values) and carry zero weight in ``log_weights``. noise: where the
        standard-normal draws come from, ``noise(shape, dtype, device) -> [*shape]`` with shape
        [M, k, *batch, D]; default ``torch.randn`` (with ``generator``).
        """
        mu, logvar = self._clean()
        eps = _standard_normal(torch.Size((mu.shape[0], k) + tuple(mu.shape[1:])), mu, generator, noise)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        return z.to(self.mu.dtype)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] | int = (), generator: torch.Generator | None = None) -> Tensor:
        """Ancestral draws from the mixture, no gradient: [*sample_shape, *batch, D]."""
        shape = _shape(sample_shape)
        with torch.no_grad():
            mu, logvar = self._clean()
            logits = self.log_weights.movedim(0, -1)  # [*batch, M]
            probs = logits.exp().reshape(-1, self.num_components)
            n = max(1, math.prod(shape))
            idx = torch.multinomial(probs, n, replacement=True, generator=generator)  # [prod(batch), n]
            idx = idx.t().reshape(shape + self.batch_shape)
            flat_mu = mu.movedim(0, -2)  # [*batch, M, D]
            flat_lv = logvar.movedim(0, -2)
            gather = idx.unsqueeze(-1).unsqueeze(-1).expand(shape + self.batch_shape + (1, mu.shape[-1]))
            m = torch.gather(flat_mu.expand(shape + flat_mu.shape), -2, gather).squeeze(-2)
            lv = torch.gather(flat_lv.expand(shape + flat_lv.shape), -2, gather).squeeze(-2)
            eps = torch.randn(m.shape, dtype=m.dtype, device=m.device, generator=generator)
            return (m + torch.exp(0.5 * lv) * eps).to(self.mu.dtype)

    def component_log_prob(self, value: Tensor) -> Tensor:
        """log N(value; mu_i, var_i) of every component: value [*sample, *batch, D] -> [*sample, M, *batch]."""
        mu, logvar = self._clean()
        z = value.to(mu.dtype).unsqueeze(-len(self.batch_shape) - 2)
        return -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """log sum_i w_i N(value; mu_i, var_i) via logsumexp(log w + log p): [*sample, *batch, D] -> [*sample, *batch]."""
        lp = self.component_log_prob(value) + self.log_weights
        return torch.logsumexp(lp, dim=-len(self.batch_shape) - 1).to(self.mu.dtype)

    def to_torch(self) -> MixtureSameFamily:
        """The same distribution as a ``torch.distributions.MixtureSameFamily`` (masked experts weight 0)."""
        mu, logvar = self._clean()
        mixture = Categorical(logits=self.log_weights.movedim(0, -1))
        experts = Independent(Normal(mu.movedim(0, -2), torch.exp(0.5 * logvar).movedim(0, -2)), 1)
        return MixtureSameFamily(mixture, experts)

    def detach(self) -> GaussianMixture:
        return GaussianMixture(self.mu.detach(), self.logvar.detach(), self.mask, self.subsets)


def _register_pytree(cls: type) -> None:
    """Make ``cls`` a pytree of its tensor fields (its ``__slots__``), so that
    a model returning it can be exported (``torch.export``, ``torch.onnx.export``: one output per field)
    and a function returning it can be transformed (``torch.func.vmap``, ``jacrev``)."""
    fields = cls.__slots__

    def unflatten(children, _context):
        # Without __init__'s shape checks: pytree utilities also unflatten placeholders (vmap's out_dims).
        result = object.__new__(cls)
        for name, child in zip(fields, children):
            setattr(result, name, child)
        return result

    pytree.register_pytree_node(
        cls,
        lambda result: ([getattr(result, name) for name in fields], None),
        unflatten,
        serialized_type_name=f"gpoe_fusion.{cls.__name__}",
        flatten_with_keys_fn=lambda result: ([(pytree.GetAttrKey(name), getattr(result, name)) for name in fields],
                                             None),
    )


_register_pytree(Gaussian)
_register_pytree(GaussianMixture)
