"""Bad input gets a clear error naming the argument at fault."""

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import functional as F


def ok(m=2, b=3, d=4):
    return torch.randn(m, b, d), torch.randn(m, b, d)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.poe(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), r"logvar: shape \(2, 3, 5\) differs from mu shape \(2, 3, 4\)"),
        (lambda: F.poe([torch.randn(3, 4), torch.randn(3, 5)], list(torch.randn(2, 3, 4))), r"mu\[1\]: shape \(3, 5\)"),
        (lambda: F.poe([torch.randn(3, 4), torch.randn(3, 4).double()], list(torch.randn(2, 3, 4))), r"mu\[1\]: dtype"),
        (lambda: F.poe(torch.randn(2, 3, 4), torch.randn(2, 3, 4).double()), r"logvar: dtype torch.float64 differs"),
        (lambda: F.poe(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4, dtype=torch.long)), r"mu: expected a floating-point"),
        (lambda: F.poe(torch.randn(4), torch.randn(4)), r"mu: expected a stacked tensor"),
        (lambda: F.poe([], []), r"mu: expected at least one expert"),
        (lambda: F.poe(*ok(), mask=torch.ones(2, 3)), r"mask: expected dtype torch.bool"),
        (lambda: F.poe(*ok(), mask=torch.ones(3, 2, dtype=torch.bool)), r"mask: expected shape \[M, \*batch\] = \(2, 3\)"),
        (lambda: F.gpoe(*ok(), torch.randn(2, 2, 4)), r"logits: shape \(2, 2, 4\) is not broadcastable"),
        (lambda: F.gpoe(*ok(), torch.ones(2, 3, 4, dtype=torch.long)), r"logits: expected a floating-point"),
        (lambda: F.poe(*ok(), mask=torch.tensor([[True, False, True], [True, False, False]])),
         r"mask: 1 batch rows have every expert masked \(first at batch index \(1,\)\)"),
        (lambda: F.poe(torch.tensor([[[float("nan")]]]), torch.zeros(1, 1, 1)), r"mu: contains NaN"),
        (lambda: F.poe(torch.zeros(1, 1, 1), torch.tensor([[[float("nan")]]])), r"logvar: contains NaN"),
        (lambda: F.gpoe(*ok(), torch.full((2, 1, 4), float("nan"))), r"logits: contains NaN"),
        (lambda: F.poe(*ok(), backend="cuda"), r"backend: expected one of"),
        (lambda: F.moe(*ok(), mask=torch.zeros(2, 3, dtype=torch.bool)), r"mask: 3 batch rows have every expert masked"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_nan_in_masked_experts_is_allowed():
    mu, logvar = ok()
    mu[1, 0] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.isfinite(F.poe(mu, logvar, mask).mu).all()


def test_value_checks_can_be_turned_off():
    mu = torch.tensor([[[float("nan")]]])
    F.poe(mu, torch.zeros(1, 1, 1), validate=False)
    gf.set_validation(False)
    try:
        assert not gf.validation_enabled()
        F.poe(mu, torch.zeros(1, 1, 1))
    finally:
        gf.set_validation(None)
    with pytest.raises(ValueError, match="mu: contains NaN"):
        F.poe(mu, torch.zeros(1, 1, 1))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_layers_raise_the_same_clear_errors(backend):
    """Through the modules, on both backends: the reduction over the joint finds the problem and
    the diagnosis names the argument."""
    mu, logvar = ok()
    mu[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="mu: contains NaN at 1 entries"):
        gf.PoE(backend=backend)(mu, logvar)
    with pytest.raises(ValueError, match="mu: contains NaN"):
        gf.GPoE(2, 4, credibility="global", backend=backend)(mu, logvar, return_weights=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[:, 1] = False
    with pytest.raises(ValueError, match="mask: 1 batch rows have every expert masked"):
        gf.PoE(backend=backend)(*ok(), mask)


def test_kernel_backend_request_fails_loudly_when_unavailable(monkeypatch):
    monkeypatch.setattr(gf.ops, "available", lambda: False)
    with pytest.raises(RuntimeError, match="backend='kernel' was requested"):
        F.poe(*ok(), backend="kernel")
    assert torch.isfinite(F.poe(*ok(), backend="auto").mu).all()


def test_gpoe_module_checks_features():
    fusion = gf.GPoE(2, 4, feature_dims=[5, 6])
    mu, logvar = ok()
    with pytest.raises(ValueError, match=r"features: expected 2 tensors"):
        fusion(mu, logvar)
    with pytest.raises(ValueError, match=r"features\[1\]: expected last dimension 6"):
        fusion(mu, logvar, features=[torch.randn(3, 5), torch.randn(3, 5)])
    with pytest.raises(ValueError, match=r"mu: expected 2 experts, got 3"):
        fusion(*ok(m=3), features=[torch.randn(3, 5), torch.randn(3, 6)])
    with pytest.raises(ValueError, match=r"feature_dims: credibility='joint' needs one feature size per expert"):
        gf.GPoE(2, 4)
