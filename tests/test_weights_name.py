"""One name for each expert's weight: ``return_weights`` in the functions, the layers and the objective
(``ObjectiveOutput.weights``). The former name ``return_alpha`` (and ``ObjectiveOutput.alpha``) still
works, with one DeprecationWarning per call, and gives exactly what the new name gives."""

import warnings

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import functional as F
from gpoe_fusion.likelihoods import squared_error

M, B, D = 2, 5, 3


def experts():
    generator = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(M, B, D, generator=generator), torch.randn(M, B, D, generator=generator)
    mask = torch.ones(M, B, dtype=torch.bool)
    mask[1, 2] = False
    return mu, logvar, torch.randn(M, B, D, generator=generator), mask


FUSIONS = {
    "F.poe": lambda mu, lv, lg, mask, **kw: F.poe(mu, lv, mask, **kw),
    "F.gpoe": lambda mu, lv, lg, mask, **kw: F.gpoe(mu, lv, lg, mask, **kw),
    "F.moe": lambda mu, lv, lg, mask, **kw: F.moe(mu, lv, mask, **kw),
    "F.mopoe": lambda mu, lv, lg, mask, **kw: F.mopoe(mu, lv, mask, lg, **kw),
    "PoE": lambda mu, lv, lg, mask, **kw: gf.PoE()(mu, lv, mask, **kw),
    "GPoE": lambda mu, lv, lg, mask, **kw: gf.GPoE(M, D, credibility="global")(mu, lv, mask, **kw),
    "MoE": lambda mu, lv, lg, mask, **kw: gf.MoE()(mu, lv, mask, **kw),
    "MoPoE": lambda mu, lv, lg, mask, **kw: gf.MoPoE()(mu, lv, mask, **kw),
}


@pytest.mark.parametrize("name", FUSIONS)
def test_return_alpha_is_a_deprecated_alias_of_return_weights(name):
    fuse = FUSIONS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        joint, weights = fuse(*experts(), return_weights=True)
    with pytest.warns(DeprecationWarning, match="return_alpha is deprecated, use return_weights") as caught:
        old_joint, old_weights = fuse(*experts(), return_alpha=True)
    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 1  # a layer warns once
    assert caught[0].filename == __file__  # it names the caller
    assert torch.equal(old_weights, weights) and torch.equal(old_joint.mu, joint.mu)
    with pytest.warns(DeprecationWarning):
        plain = fuse(*experts(), return_alpha=False)
    assert torch.equal(plain.mu, joint.mu)
    with pytest.raises(ValueError, match="return_alpha: give return_weights or its deprecated alias return_alpha"):
        fuse(*experts(), return_weights=True, return_alpha=True)


def test_objective_output_alpha_is_a_deprecated_name_of_weights():
    objective = gf.CrossModalObjective(gf.PoE(), {"y": torch.nn.Linear(D, 2)}, {"y": squared_error})
    mu, logvar, _, _ = experts()
    out = objective({"a": (mu[0], logvar[0]), "b": (mu[1], logvar[1])}, {"y": torch.zeros(B, 2)},
                    return_weights=True)
    with pytest.warns(DeprecationWarning, match="ObjectiveOutput.alpha is deprecated, use ObjectiveOutput.weights"):
        assert out.alpha is out.weights
