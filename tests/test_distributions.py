"""Gaussian and GaussianMixture against torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from gpoe_fusion import Gaussian, GaussianMixture


def gaussian(seed=0, shape=(5, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Gaussian(torch.randn(shape, generator=g, dtype=dtype), 2 * torch.randn(shape, generator=g, dtype=dtype))


def test_unpacks_as_mu_logvar_pair():
    q = gaussian()
    mu, logvar = q
    assert mu is q.mu and logvar is q.logvar and len(q) == 2 and q[1] is q.logvar


def test_log_prob_entropy_kl_match_torch_distributions():
    q, r = gaussian(0), gaussian(1)
    z = torch.randn(7, 5, 3, dtype=torch.float64)
    tq, tr = q.to_torch(), r.to_torch()
    torch.testing.assert_close(q.log_prob(z), tq.log_prob(z))
    torch.testing.assert_close(q.entropy(), tq.entropy())
    standard = Independent(Normal(torch.zeros(5, 3, dtype=torch.float64), torch.ones(5, 3, dtype=torch.float64)), 1)
    torch.testing.assert_close(q.kl_standard_normal(), kl_divergence(tq, standard))
    torch.testing.assert_close(q.kl(r), kl_divergence(tq, tr))
    torch.testing.assert_close(q.kl(q), torch.zeros(5, dtype=torch.float64))


def test_kl_is_exact_at_extreme_logvar():
    # exp(-80) as a variance is fine in float64 but these stay exact in float32 too.
    q = Gaussian(torch.tensor([[0.5]]), torch.tensor([[-80.0]]))
    expected = 0.5 * (math.exp(-80.0) - 1.0 + 80.0 + 0.25)
    assert q.kl_standard_normal().item() == pytest.approx(expected, rel=1e-6)
    tiny = Gaussian(torch.tensor([[0.0]]), torch.tensor([[1e-4]]))
    # KL ~ lv^2 / 4 near lv = 0: expm1 keeps it from cancelling to 0.
    assert tiny.kl_standard_normal().item() == pytest.approx(0.25e-8, rel=1e-3)


def test_rsample_is_differentiable_and_has_the_right_moments():
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(4.0)], requires_grad=True)
    z = Gaussian(mu, logvar).rsample(20000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (20000, 2)
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.05, rtol=0)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert not Gaussian(mu, logvar).sample((3,)).requires_grad


def test_half_precision_results_are_finite_in_their_dtype():
    q = Gaussian(torch.zeros(4, dtype=torch.bfloat16), torch.tensor([-80.0, -20.0, 20.0, 80.0], dtype=torch.bfloat16))
    for value in (q.kl_standard_normal(), q.entropy(), q.log_prob(torch.zeros(4, dtype=torch.bfloat16))):
        assert value.dtype == torch.bfloat16
        assert not torch.isnan(value).any()


def mixture(mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
                           torch.randn(3, 4, 2, generator=g, dtype=torch.float64), mask)


def test_mixture_log_prob_matches_mixture_same_family():
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [False, False, True, True]])
    for m in (None, mask):
        mix = mixture(m)
        z = torch.randn(6, 4, 2, dtype=torch.float64)
        torch.testing.assert_close(mix.log_prob(z), mix.to_torch().log_prob(z))
        torch.testing.assert_close(mix.mean, mix.to_torch().mean)
        torch.testing.assert_close(mix.variance, mix.to_torch().variance)


def test_mixture_log_prob_ignores_masked_experts_values():
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [False, False, True, True]])
    a = mixture(mask)
    mu, logvar = a.mu.clone(), a.logvar.clone()
    mu[~mask], logvar[~mask] = float("nan"), float("inf")
    b = GaussianMixture(mu, logvar, mask)
    z = torch.randn(5, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(a.log_prob(z), b.log_prob(z))


def test_stratified_rsample_draws_k_from_every_expert():
    mix = mixture()
    z = mix.rsample(4000, generator=torch.Generator().manual_seed(1))
    assert z.shape == (3, 4000, 4, 2)
    torch.testing.assert_close(z.mean(1), mix.mu, atol=0.15, rtol=0)
    torch.testing.assert_close(z.var(1).log(), mix.logvar, atol=0.15, rtol=0)


def test_ancestral_sample_matches_mixture_moments():
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [False, False, True, True]])
    mix = mixture(mask)
    z = mix.sample((40000,), generator=torch.Generator().manual_seed(2))
    assert z.shape == (40000, 4, 2) and not z.requires_grad
    torch.testing.assert_close(z.mean(0), mix.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0), mix.variance, atol=0.1, rtol=0.05)
