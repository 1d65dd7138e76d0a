"""The fusion algebra (PoE, gPoE, MoE) on the pure-PyTorch path, against an independent float64 oracle."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpoe_fusion as gf
from gpoe_fusion import functional as F
from oracle import weighted_product

F32_EPS = float(torch.finfo(torch.float32).eps)


@st.composite
def experts(draw, max_m=6, lo=-80.0, hi=80.0, with_mask=False):
    """Random (mu, logvar, logits, mask) float64 arrays, M experts, batch 3, D 4."""
    m = draw(st.integers(1, max_m))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (m, 3, 4)
    mu = rng.normal(0, 3, shape)
    logvar = rng.uniform(lo, hi, shape)
    logits = rng.normal(0, 2, shape)
    mask = None
    if with_mask:
        mask = rng.random(shape[:-1]) < 0.7
        mask[rng.integers(0, m, size=3), np.arange(3)] = True  # every row keeps an expert
    return mu, logvar, logits, mask


def t(x, dtype=torch.float64):
    return None if x is None else torch.as_tensor(x, dtype=dtype if np.asarray(x).dtype != bool else torch.bool)


def rounded(x, dtype):
    """x as the fusion sees it: rounded to dtype, so the oracle measures the computation alone."""
    return None if x is None else t(x, dtype).double().numpy()


def assert_matches_oracle(joint, mu, logvar, logits, mask, prior, dtype):
    """The fusion against the oracle on the same rounded inputs: the computation's own error only.

    PoE forms s_i = -logvar_i exactly, so its error is a few roundings of the result. gPoE forms
    s_i = log(alpha_i) - logvar_i in the working precision, which rounds it by up to eps * |s_i|;
    each weight exp(s_i) then carries that relative error, and the mean up to
    2 eps max|s| times the spread of the experts' means (docs/math.md).
    """
    mu, logvar, logits = rounded(mu, dtype), rounded(logvar, dtype), rounded(logits, dtype)
    ref_mu, ref_lv = weighted_product(mu, logvar, logits, mask, prior)
    eps = F32_EPS if dtype == torch.float32 else 1e-15
    present = np.broadcast_to((np.ones(mu.shape[:-1], bool) if mask is None else mask)[..., None], mu.shape)
    scale_mu = np.maximum(1.0, np.abs(np.where(present, mu, 0)).max(0))
    if logits is None:
        s_max = 0.0
    else:
        log_alpha = logits - np.log(np.where(present, np.exp(logits), 0).sum(0, keepdims=True))
        s_max = np.abs(np.where(present, log_alpha - logvar, 0)).max(0)
    got_mu = joint.mu.double().numpy()
    got_lv = joint.logvar.double().numpy()
    assert np.all(np.abs(got_lv - ref_lv) <= 16 * eps * np.maximum(1.0, np.abs(ref_lv))), (got_lv, ref_lv)
    assert np.all(np.abs(got_mu - ref_mu) <= eps * scale_mu * (16 + 2 * s_max)), (got_mu, ref_mu)


def test_peer_case_is_exact():
    # The case the eps-regularised formula of other libraries gets wrong (mu 2.080, logvar -19.01).
    mu = torch.tensor([[[1.0]], [[3.0]]])
    logvar = torch.tensor([[[-20.0]], [[-22.0]]])
    joint = F.poe(mu, logvar)
    exact_mu = (1 * math.exp(20) + 3 * math.exp(22)) / (math.exp(20) + math.exp(22))
    exact_lv = -math.log(math.exp(20) + math.exp(22))
    assert joint.mu.item() == pytest.approx(exact_mu, rel=2 * F32_EPS)
    assert joint.logvar.item() == pytest.approx(exact_lv, rel=2 * F32_EPS)
    assert round(joint.mu.item(), 3) == 2.762 and round(joint.logvar.item(), 2) == -22.13
    joint = F.poe(mu.new_tensor([[[0.0]], [[0.0]]]), logvar.new_tensor([[[-30.0]], [[0.0]]]))
    assert joint.logvar.item() == pytest.approx(-30.0, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(experts(with_mask=True), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_poe_matches_float64_oracle(data, prior, dtype):
    mu, logvar, _, mask = data
    joint = F.poe(t(mu, dtype), t(logvar, dtype), t(mask), prior_expert=prior, backend="torch")
    assert_matches_oracle(joint, mu, logvar, None, mask, prior, dtype)


@settings(max_examples=60, deadline=None)
@given(experts(with_mask=True), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_gpoe_matches_float64_oracle(data, prior, dtype):
    mu, logvar, logits, mask = data
    joint = F.gpoe(t(mu, dtype), t(logvar, dtype), t(logits, dtype), t(mask), prior_expert=prior, backend="torch")
    assert_matches_oracle(joint, mu, logvar, logits, mask, prior, dtype)


@settings(max_examples=40, deadline=None)
@given(experts(with_mask=True))
def test_uniform_alpha_reduces_to_poe(data):
    mu, logvar, _, mask = data
    mu, logvar, mask = t(mu), t(logvar), t(mask)
    poe = F.poe(mu, logvar, mask, backend="torch")
    gpoe = F.gpoe(mu, logvar, torch.zeros_like(mu), mask, backend="torch")
    log_m = torch.log(mask.sum(0).double()).unsqueeze(-1)  # log M_present per row: [batch, 1]
    torch.testing.assert_close(gpoe.mu, poe.mu, rtol=1e-12, atol=1e-12)
    # alpha = 1/M_present: the joint precision is PoE's divided by M_present ...
    torch.testing.assert_close(gpoe.logvar, poe.logvar + log_m, rtol=1e-12, atol=1e-12)
    # ... and scaling every alpha back up to 1 (the unnormalised weights) gives PoE exactly.
    torch.testing.assert_close(gpoe.logvar - log_m, poe.logvar, rtol=1e-12, atol=1e-12)


def test_one_hot_alpha_selects_that_expert():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g) * 10
    for k in range(3):
        logits = torch.full((3, 1, 4), float("-inf"))
        logits[k] = 0.0
        joint = F.gpoe(mu, logvar, logits, backend="torch")
        torch.testing.assert_close(joint.mu, mu[k])
        torch.testing.assert_close(joint.logvar, logvar[k])


@settings(max_examples=40, deadline=None)
@given(experts(with_mask=True), st.booleans(), st.integers(0, 2**16))
def test_permutation_invariance(data, prior, seed):
    mu, logvar, logits, mask = (t(x) for x in data)
    perm = torch.randperm(mu.shape[0], generator=torch.Generator().manual_seed(seed))
    a = F.gpoe(mu, logvar, logits, mask, prior, backend="torch")
    b = F.gpoe(mu[perm], logvar[perm], logits[perm], mask[perm], prior, backend="torch")
    torch.testing.assert_close(a.mu, b.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.logvar, b.logvar, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(experts(max_m=5), st.booleans())
def test_masking_an_expert_equals_removing_it(data, prior):
    mu, logvar, logits, _ = (t(x) for x in data)
    m = mu.shape[0]
    if m < 2:
        return
    k = m - 1
    mask = torch.ones(mu.shape[:-1], dtype=torch.bool)
    mask[k] = False
    # The masked expert holds garbage: it must not leak into the result.
    mu_bad, logvar_bad, logits_bad = mu.clone(), logvar.clone(), logits.clone()
    mu_bad[k], logvar_bad[k], logits_bad[k] = float("nan"), float("-inf"), float("nan")
    for fuse, args_masked, args_removed in (
        (F.poe, (mu_bad, logvar_bad), (mu[:k], logvar[:k])),
        (F.gpoe, (mu_bad, logvar_bad, logits_bad), (mu[:k], logvar[:k], logits[:k])),
    ):
        a = fuse(*args_masked, mask=mask, prior_expert=prior, backend="torch")
        b = fuse(*args_removed, prior_expert=prior, backend="torch")
        torch.testing.assert_close(a.mu, b.mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.logvar, b.logvar, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(experts(with_mask=True))
def test_prior_expert_equals_appending_standard_normal(data):
    mu, logvar, logits, mask = (t(x) for x in data)
    with_prior = F.poe(mu, logvar, mask, prior_expert=True, backend="torch")
    appended = F.poe(torch.cat([mu, torch.zeros_like(mu[:1])]), torch.cat([logvar, torch.zeros_like(logvar[:1])]),
                     torch.cat([mask, torch.ones_like(mask[:1])]), backend="torch")
    torch.testing.assert_close(with_prior.mu, appended.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_prior.logvar, appended.logvar, rtol=1e-12, atol=1e-12)
    # gPoE's prior has weight 1 outside the softmax: gPoE of the modalities, then PoE with N(0, I).
    g_prior = F.gpoe(mu, logvar, logits, mask, prior_expert=True, backend="torch")
    g = F.gpoe(mu, logvar, logits, mask, backend="torch")
    then_prior = F.poe(torch.stack([g.mu, torch.zeros_like(g.mu)]), torch.stack([g.logvar, torch.zeros_like(g.logvar)]), backend="torch")
    torch.testing.assert_close(g_prior.mu, then_prior.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_prior.logvar, then_prior.logvar, rtol=1e-12, atol=1e-12)


def test_prior_expert_covers_fully_masked_rows():
    mu, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    joint = F.gpoe(mu, logvar, torch.randn(2, 3, 4), mask, prior_expert=True)
    torch.testing.assert_close(joint.mu[1], torch.zeros(4))
    torch.testing.assert_close(joint.logvar[1], torch.zeros(4))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.floats(-80, 80), st.floats(-5, 5))
def test_identical_experts(m, lv, mean):
    mu = torch.full((m, 2, 3), mean, dtype=torch.float64)
    logvar = torch.full((m, 2, 3), lv, dtype=torch.float64)
    joint = F.poe(mu, logvar, backend="torch")
    torch.testing.assert_close(joint.mu, mu[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(joint.logvar, logvar[0] - math.log(m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_has_no_nan_or_inf(dtype):
    grid = torch.linspace(-80, 80, 41)
    lv = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).reshape(2, -1, 1)
    mu = torch.stack([torch.ones_like(lv[0]), 3 * torch.ones_like(lv[0])])
    for joint in (F.poe(mu.to(dtype), lv.to(dtype)), F.gpoe(mu.to(dtype), lv.to(dtype), torch.randn(2, lv.shape[1], 1).to(dtype))):
        assert joint.mu.dtype == dtype and joint.logvar.dtype == dtype
        assert torch.isfinite(joint.mu).all() and torch.isfinite(joint.logvar).all()
    ref_mu, ref_lv = weighted_product(mu.to(dtype).double().numpy(), lv.to(dtype).double().numpy())
    got = F.poe(mu.to(dtype), lv.to(dtype))
    tol = float(torch.finfo(dtype).eps)
    assert np.all(np.abs(got.logvar.double().numpy() - ref_lv) <= tol * np.maximum(1, np.abs(ref_lv)))
    assert np.all(np.abs(got.mu.double().numpy() - ref_mu) <= 3 * tol)


def test_sequence_input_equals_stacked_input():
    mu, logvar, logits = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    a = F.gpoe(list(mu), list(logvar), list(logits))
    b = F.gpoe(mu, logvar, logits)
    torch.testing.assert_close(a.mu, b.mu)
    torch.testing.assert_close(a.logvar, b.logvar)


@pytest.mark.parametrize("shape", [(3, 1, 5), (3, 4, 1), (3, 1, 1), (1, 4, 5)])
def test_broadcast_logits_equal_expanded_logits(shape):
    mu, logvar = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    logits = torch.randn(shape, dtype=torch.float64)
    a = F.gpoe(mu, logvar, logits)
    b = F.gpoe(mu, logvar, logits.expand(3, 4, 5).contiguous())
    torch.testing.assert_close(a.mu, b.mu)
    torch.testing.assert_close(a.logvar, b.logvar)


def test_batch_shapes_of_any_rank():
    mu, logvar, logits = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 5)
    mask = torch.rand(2, 3, 4) < 0.5
    mask[0] = True
    joint = F.gpoe(mu, logvar, logits, mask)
    flat = F.gpoe(mu.reshape(2, 12, 5), logvar.reshape(2, 12, 5), logits.expand(2, 3, 4, 5).reshape(2, 12, 5), mask.reshape(2, 12))
    torch.testing.assert_close(joint.mu.reshape(12, 5), flat.mu)
    torch.testing.assert_close(joint.logvar.reshape(12, 5), flat.logvar)


def test_empty_batch():
    joint = F.gpoe(torch.zeros(3, 0, 4), torch.zeros(3, 0, 4), torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.bool))
    assert joint.mu.shape == (0, 4) and joint.logvar.shape == (0, 4)
    mix = F.moe(torch.zeros(3, 0, 4), torch.zeros(3, 0, 4))
    assert mix.mean.shape == (0, 4)


def test_gradcheck_reference_path():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    logvar = (4 * torch.randn(3, 4, 5, dtype=torch.float64, generator=g)).requires_grad_()
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    shared = torch.randn(3, 1, 5, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.tensor([[True, False, True, False], [True, True, False, False], [False, True, True, False]])

    def fused(mu, logvar, logits, mask, prior):
        joint = F.gpoe(mu, logvar, logits, mask, prior_expert=prior, backend="torch")
        return joint.mu, joint.logvar

    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, None, False), (mu, logvar, logits))
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, mask, True), (mu, logvar, logits))
    assert torch.autograd.gradcheck(lambda a, b, c: fused(a, b, c, mask[:, :3], False), (mu[:, :3], logvar[:, :3], shared))
    assert torch.autograd.gradcheck(lambda a, b: tuple(F.poe(a, b, mask, prior_expert=True, backend="torch")), (mu, logvar))


def test_no_gradient_leaks_into_masked_experts():
    mu = torch.randn(2, 3, 4, requires_grad=True)
    logvar = torch.randn(2, 3, 4, requires_grad=True)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, False]])
    joint = F.gpoe(mu, logvar, logits, mask, prior_expert=True, backend="torch")
    (joint.mu.sum() + joint.logvar.sum()).backward()
    for grad in (mu.grad, logvar.grad, logits.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()


def test_credibility_weights_sum_to_one_over_present():
    logits = torch.randn(4, 6, 3)
    mask = torch.rand(4, 6) < 0.6
    mask[0] = True
    alpha = F.credibility_weights(logits, mask)
    torch.testing.assert_close(alpha.sum(0), torch.ones(6, 3))
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(F.credibility_weights(logits), torch.softmax(logits, 0))


def test_moe_returns_mixture_of_present_experts():
    mu, logvar = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [False, False, True, True]])
    mix = F.moe(mu, logvar, mask)
    assert isinstance(mix, gf.GaussianMixture)
    expected = torch.where(mask, 1.0 / mask.sum(0, keepdim=True), torch.zeros(()))
    torch.testing.assert_close(mix.log_weights.exp(), expected)
