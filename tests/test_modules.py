"""The fusion layers and the credibility networks."""

import math

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import functional as F


def inputs(m=3, b=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.randn(m, b, d, generator=g), torch.randn(m, b, d, generator=g)
    features = [torch.randn(b, 6 + i, generator=g) for i in range(m)]
    return mu, logvar, features


@pytest.mark.parametrize("fusion", [gf.PoE(), gf.PoE(prior_expert=True), gf.MoE(),
                                    gf.GPoE(3, 4, [6, 7, 8]), gf.GPoE(3, 4, [6, 7, 8], credibility="independent"),
                                    gf.GPoE(3, 4, credibility="global", prior_expert=True)])
def test_one_call_form_for_every_fusion(fusion):
    mu, logvar, features = inputs()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = False
    out = fusion(mu, logvar, mask=mask, features=features)
    assert out.mean.shape == (5, 4)
    out_list = fusion(list(mu), list(logvar), mask=mask, features=features)
    torch.testing.assert_close(out.mean, out_list.mean)


@pytest.mark.parametrize("kind", ["joint", "independent", "global"])
def test_gpoe_starts_at_uniform_alpha(kind):
    mu, logvar, features = inputs()
    fusion = gf.GPoE(3, 4, [6, 7, 8], credibility=kind)
    joint, alpha = fusion(mu, logvar, features=features, return_weights=True)
    torch.testing.assert_close(alpha, torch.full((3, 5, 4), 1 / 3).expand_as(alpha))
    poe = F.poe(mu, logvar)
    torch.testing.assert_close(joint.mu, poe.mu)
    torch.testing.assert_close(joint.logvar, poe.logvar + math.log(3))


@pytest.mark.parametrize("kind", ["joint", "independent"])
def test_credibility_is_input_dependent_and_trainable(kind):
    torch.manual_seed(0)
    mu, logvar, features = inputs()
    fusion = gf.GPoE(3, 4, [6, 7, 8], credibility=kind, hidden=(16,))
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.5)
    joint, alpha = fusion(mu, logvar, features=features, return_weights=True)
    assert alpha.shape == (3, 5, 4)
    torch.testing.assert_close(alpha.sum(0), torch.ones(5, 4))
    assert alpha.std(dim=1).mean() > 1e-3  # differs between samples
    (joint.mu.sum() + joint.logvar.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert any(p.grad.abs().sum() > 0 for p in fusion.parameters())


def test_independent_credibility_sees_only_its_own_modality():
    fusion = gf.GPoE(2, 3, [4, 4], credibility="independent", hidden=(8,))
    for p in fusion.parameters():
        torch.nn.init.normal_(p)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    logits1 = fusion.credibility([a, b])
    logits2 = fusion.credibility([a, torch.randn(2, 4)])
    torch.testing.assert_close(logits1[0], logits2[0])
    assert not torch.allclose(logits1[1], logits2[1])


def test_global_credibility_broadcasts_over_any_batch_shape():
    fusion = gf.GPoE(2, 3, credibility="global")
    with torch.no_grad():
        fusion.credibility.logits.copy_(torch.tensor([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]]))
    mu, logvar = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    joint, alpha = fusion(mu, logvar, return_weights=True)
    assert joint.mu.shape == (4, 5, 3)
    torch.testing.assert_close(alpha[:, 0, 0], torch.softmax(fusion.credibility.logits.detach(), 0))


def test_masked_modality_gets_zero_alpha():
    mu, logvar, features = inputs()
    fusion = gf.GPoE(3, 4, [6, 7, 8])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    _, alpha = fusion(mu, logvar, mask, features, return_weights=True)
    assert (alpha[0, :2] == 0).all()
    torch.testing.assert_close(alpha[1:, :2], torch.full((2, 2, 4), 0.5))


def test_credibility_features_are_standardised_over_the_batch():
    from gpoe_fusion.credibility import FeatureStandardizer

    norm = FeatureStandardizer(3)
    x = 100.0 + torch.randn(64, 3, generator=torch.Generator().manual_seed(0))  # a component all samples share
    y = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert norm(x[:1]).shape == (1, 3)  # one row in training mode: running statistics, no error
    norm.eval()
    torch.testing.assert_close(norm(x[:5]), (x[:5] - norm.running_mean) / (norm.running_var + 1e-5).sqrt())
    fusion = gf.GPoE(2, 4, [3, 3], hidden=(8,))
    joint = fusion(torch.randn(2, 1, 4), torch.randn(2, 1, 4), features=[torch.randn(1, 3), torch.randn(1, 3)])
    assert joint.mu.shape == (1, 4)
