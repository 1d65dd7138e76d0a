"""torch.func: vmap over the functions and the layers with default arguments, and grad / jacrev of
their outputs equal to autograd through the fused kernel. Under a transform the functions take the
pure-PyTorch path and skip the value checks, which read results on the host; eagerly, both stay as
they were (the kernel, the checks)."""

from __future__ import annotations

import warnings

import pytest
import torch
from fusion_models import LAYERS, features, make_model
from torch.func import functional_call, grad, jacrev, vmap

import gpoe_fusion as gf
from gpoe_fusion import _backend
from gpoe_fusion import functional as F

V, M, B, D = 4, 3, 5, 6


def _experts(dtype=torch.float64, seed=0):
    """V independent sets of experts: mu, logvar, logits [V, M, B, D]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(V, M, B, D, generator=g, dtype=dtype) for _ in range(3))


def _components(mixture: gf.GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    return mixture.mu, mixture.logvar


FUNCTIONS = {
    "poe": lambda mu, logvar, logits: F.poe(mu, logvar),
    "gpoe": lambda mu, logvar, logits: F.gpoe(mu, logvar, logits),
    "gpoe-global-logits": lambda mu, logvar, logits: F.gpoe(mu, logvar, logits[:, :1]),
    "poe-prior": lambda mu, logvar, logits: F.poe(mu, logvar, prior_expert=True),
    # Mixtures hold a component axis first; vmap their tensors.
    "mopoe": lambda mu, logvar, logits: _components(F.mopoe(mu, logvar)),
    "mopoe-logits": lambda mu, logvar, logits: _components(F.mopoe(mu, logvar, logits=logits)),
    "moe": lambda mu, logvar, logits: F.moe(mu, logvar).mean,
}


def _tensors(result) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(result)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_over_the_functions(name):
    fn = FUNCTIONS[name]
    mu, logvar, logits = _experts()
    got = vmap(fn)(mu, logvar, logits)
    want = [torch.stack(ts) for ts in zip(*(_tensors(fn(mu[v], logvar[v], logits[v])) for v in range(V)))]
    for g, w in zip(_tensors(got), want):
        torch.testing.assert_close(g, w)


def test_vmap_returns_the_gaussian():
    """A Gaussian is a pytree: vmap(F.poe) returns one, batched."""
    mu, logvar, _ = _experts()
    joint = vmap(F.poe)(mu, logvar)
    assert isinstance(joint, gf.Gaussian) and joint.mu.shape == (V, B, D)
    torch.testing.assert_close(joint.logvar[1], F.poe(mu[1], logvar[1]).logvar)


def test_vmap_with_masks_and_over_the_middle_axis():
    mu, logvar, logits = _experts()
    mask = torch.rand(V, M, B, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    got = vmap(lambda a, b, c, m: F.gpoe(a, b, c, m).mu, in_dims=(1, 1, 1, 1))(
        mu.movedim(0, 1), logvar.movedim(0, 1), logits.movedim(0, 1), mask.movedim(0, 1))
    want = torch.stack([F.gpoe(mu[v], logvar[v], logits[v], mask[v]).mu for v in range(V)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", LAYERS)
def test_vmap_over_a_model_with_each_layer(kind):
    """vmap over V batches of features through encoders, the layer (default arguments) and a decoder."""
    model = make_model(kind, torch.float64)
    batches = [features(B, seed=v, dtype=torch.float64) for v in range(V)]
    got = vmap(model)(*(torch.stack(x) for x in zip(*batches)))
    want = [torch.stack(ts) for ts in zip(*(model(*x) for x in batches))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _scalar(result) -> torch.Tensor:
    """A scalar that reads every output tensor with different weights."""
    return sum(((t.double() - 0.3) ** 2 * (i + 1)).sum() for i, t in enumerate(_tensors(result)))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_grad_and_jacrev_equal_autograd_through_the_kernel(name):
    fn = FUNCTIONS[name]
    mu, logvar, logits = (t[0] for t in _experts())
    leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]
    want = torch.autograd.grad(_scalar(fn(*leaves)), leaves, allow_unused=True, materialize_grads=True)
    got = grad(lambda *args: _scalar(fn(*args)), argnums=(0, 1, 2))(mu, logvar, logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # The Jacobian of the first output's first row with respect to mu, row by row with autograd.
    first = lambda a: _tensors(fn(a, logvar, logits))[0].flatten()[:D]
    jacobian = jacrev(first)(mu)
    out = first(leaves[0])
    rows = [torch.autograd.grad(out[i], leaves[0], retain_graph=True)[0] for i in range(D)]
    torch.testing.assert_close(jacobian, torch.stack(rows))


@pytest.mark.parametrize("kind", LAYERS)
def test_grad_of_a_model_with_each_layer_over_its_parameters(kind):
    model = make_model(kind, torch.float64)
    x = features(B, dtype=torch.float64)
    params = dict(model.named_parameters())
    got = grad(lambda p: _scalar(functional_call(model, p, x)))(params)
    want = torch.autograd.grad(_scalar(model(*x)), list(params.values()))
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


def test_the_kernel_runs_eagerly_and_the_pure_pytorch_path_under_transforms():
    mu, logvar, _ = _experts(torch.float32)
    assert _backend.use_kernel(mu[0].device, mu[0].dtype, "auto")
    seen = []

    def record(mu):
        seen.append(_backend.use_kernel(mu.device, mu.dtype, "auto"))
        return mu.sum()

    vmap(record)(mu)
    grad(record)(mu[0])
    assert seen == [False, False]
    with pytest.raises(RuntimeError, match=r"backend='kernel' was requested but a torch.func transform"):
        vmap(lambda a, b: F.poe(a, b, backend="kernel").mu)(mu, logvar)


def test_value_checks_run_eagerly_and_are_skipped_under_transforms_and_tracing():
    mu, logvar, _ = _experts(torch.float32)
    mu[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="mu: contains NaN"):
        F.poe(mu[1], logvar[1])
    joint = vmap(lambda a, b: F.poe(a, b, validate=True).mu)(mu, logvar)
    assert torch.isnan(joint[1, 2, 3]) and torch.isfinite(joint[0]).all()
    _, joint = grad(lambda a: (F.poe(a, logvar[1], validate=True).mu.sum(), F.poe(a, logvar[1]).mu), has_aux=True)(mu[1])
    assert torch.isnan(joint[2, 3])
    seen = []

    def record(x):
        seen.append(gf.validation_enabled())
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated (and still used)
        torch.jit.trace(record, torch.ones(1), check_trace=False)
    assert seen == [False] and gf.validation_enabled()
