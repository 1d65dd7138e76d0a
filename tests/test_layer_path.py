"""The path users call: layers and functions with alpha, higher-order gradients, missing
modalities, and value checks that stay off the hot path."""

from __future__ import annotations

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import _reference
from gpoe_fusion import functional as F

BACKENDS = ["auto", "torch"]


def experts(m=3, b=6, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(m, b, d, generator=g, dtype=dtype)
    logvar = torch.randn(m, b, d, generator=g, dtype=dtype) * 2
    logits = torch.randn(m, b, d, generator=g, dtype=dtype)
    mask = torch.rand(m, b, generator=g) > 0.3
    mask[0] = True
    return mu, logvar, logits, mask


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the credibility networks' last layer starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ---- alpha from every layer ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prior", [False, True])
def test_poe_alpha_is_the_share_of_the_joint_precision(backend, prior):
    mu, logvar, _, mask = experts()
    joint, alpha = gf.PoE(prior_expert=prior, backend=backend)(mu, logvar, mask, return_weights=True)
    precision = torch.exp(-logvar) * mask.unsqueeze(-1)
    total = precision.sum(0) + (1.0 if prior else 0.0)
    torch.testing.assert_close(alpha, precision / total)
    torch.testing.assert_close(joint.mu, (alpha * mu.nan_to_num()).sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["joint", "independent", "global"])
def test_gpoe_alpha_is_the_credibility_softmax(backend, kind):
    mu, logvar, _, mask = experts()
    features = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    fusion = randomise(gf.GPoE(3, 5, [4, 4, 4], credibility=kind, hidden=(8,), backend=backend).double())
    joint, alpha = fusion(mu, logvar, mask, features, return_weights=True)
    torch.testing.assert_close(alpha, F.credibility_weights(fusion.logits(mu, logvar, features, mask), mask))
    assert torch.equal(alpha[~mask], torch.zeros_like(alpha[~mask]))
    torch.testing.assert_close(joint.mu, F.gpoe(mu, logvar, fusion.logits(mu, logvar, features, mask), mask).mu)


def test_moe_alpha_is_the_mixture_weights():
    mu, logvar, _, mask = experts()
    mixture, alpha = gf.MoE()(mu, logvar, mask, return_weights=True)
    assert alpha.shape == mu.shape
    want = mask.double() / mask.sum(0)
    torch.testing.assert_close(alpha, want.unsqueeze(-1).expand_as(alpha))
    assert isinstance(mixture, gf.GaussianMixture)


@pytest.mark.parametrize("fusion", [gf.PoE(), gf.MoE(), gf.GPoE(3, 5, credibility="global")])
def test_swapping_layers_is_one_line(fusion):
    mu, logvar, _, mask = experts(dtype=torch.float32)
    joint, alpha = fusion(mu, logvar, mask, return_weights=True)
    assert alpha.shape == mu.shape and alpha.dtype == mu.dtype
    torch.testing.assert_close(alpha.sum(0), torch.ones(6, 5))


@pytest.mark.parametrize("prior", [False, True])
def test_alpha_gradient_matches_reference(prior):
    """A loss on alpha trains the logits (gPoE) and the log-variances (PoE) through the fused op."""
    mu, logvar, logits, mask = experts()
    target = torch.rand(3, 6, 5, dtype=torch.float64)
    for use_logits in (True, False):
        grads = []
        for backend in BACKENDS:
            leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]
            if use_logits:
                joint, alpha = F.gpoe(*leaves[:2], leaves[2], mask, prior, backend=backend, return_weights=True)
            else:
                joint, alpha = F.poe(*leaves[:2], mask, prior, backend=backend, return_weights=True)
            loss = ((alpha - target) ** 2).sum() + joint.mu.sum()
            grads.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
        for name, got, want in zip(("mu", "logvar", "logits"), *grads):
            torch.testing.assert_close(got, want, msg=lambda m: f"logits={use_logits}, grad {name}: {m}")


def test_compile_fullgraph_with_alpha():
    torch._dynamo.reset()
    mu, logvar, _, mask = experts(dtype=torch.float32)
    fusion = randomise(gf.GPoE(3, 5, credibility="global"))

    def step(mu, logvar):
        joint, alpha = fusion(mu, logvar, mask, return_weights=True)
        return joint.mu.sum() + joint.logvar.sum() + (alpha ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (mu, logvar)]
        value = fn(*leaves)
        results.append([value, *torch.autograd.grad(value, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# ---- higher-order gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [False, True], ids=["joint", "alpha"])
@pytest.mark.parametrize("use_logits", [False, True], ids=["poe", "gpoe"])
@pytest.mark.parametrize("prior", [False, True])
def test_double_backward_matches_torch_backend(use_logits, prior, alpha):
    mu, logvar, logits, mask = experts()
    second = []
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]
        args = (leaves[0], leaves[1], leaves[2]) if use_logits else (leaves[0], leaves[1])
        fuse = F.gpoe if use_logits else F.poe
        out = fuse(*args, mask, prior, backend=backend, return_weights=alpha)
        joint = out[0] if alpha else out
        loss = (joint.mu ** 2).sum() + (joint.logvar * joint.mu).sum() + ((out[1] ** 3).sum() if alpha else 0)
        first = torch.autograd.grad(loss, args, create_graph=True)
        assert all(g.grad_fn is not None for g in first), f"{backend}: first-order gradient not differentiable"
        total = sum((g ** 2).sum() for g in first)
        second.append(torch.autograd.grad(total, args, allow_unused=True, materialize_grads=True))
    for name, got, want in zip(("mu", "logvar", "logits"), *second):
        torch.testing.assert_close(got, want, msg=lambda m: f"second-order grad {name}: {m}")


def test_gradgradcheck_through_the_kernel_backend():
    if not gf.extension_available():
        pytest.skip("extension not built")
    mu, logvar, logits, mask = experts(m=3, b=3, d=4)
    leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]

    def fused(mu, logvar, logits):
        joint, alpha = F.gpoe(mu, logvar, logits, mask, True, backend="kernel", return_weights=True)
        return joint.mu, joint.logvar, alpha

    assert torch.autograd.gradgradcheck(fused, leaves)


# ---- missing modalities --------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["joint", "independent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_do_not_leak_into_other_samples(kind, train, backend):
    """Garbage in a masked modality's rows (features, mu, logvar) changes nothing anywhere else:
    not the joint, not alpha, not the running statistics."""
    mu, logvar, _, mask = experts(m=2, b=8, d=4, dtype=torch.float32)
    mask[1, :3] = False
    features = [torch.randn(8, 6), torch.randn(8, 5)]
    fusion = randomise(gf.GPoE(2, 4, [6, 5], credibility=kind, hidden=(16,), backend=backend))
    for _ in range(3):  # running statistics away from their initial values
        fusion(mu, logvar, mask, [f + torch.randn_like(f) for f in features])
    fusion.train(train)
    state = {k: v.clone() for k, v in fusion.state_dict().items()}

    def run(garbage: float):
        fusion.load_state_dict(state)
        f1 = features[1].clone()
        f1[~mask[1]] = garbage
        m, lv = mu.clone(), logvar.clone()
        m[1][~mask[1]] = garbage
        lv[1][~mask[1]] = garbage
        joint, alpha = fusion(m, lv, mask, [features[0], f1], return_weights=True)
        return joint.mu, joint.logvar, alpha, *[v.clone() for v in fusion.state_dict().values()]

    clean = run(0.0)
    for garbage in (1e4, -3e3, float("nan"), float("inf")):
        for got, want in zip(run(garbage), clean):
            assert torch.equal(got, want), f"garbage {garbage} leaked"


# ---- value checks off the hot path ---------------------------------------------------------------

def test_clean_inputs_are_never_diagnosed(monkeypatch):
    """Value checks cost one reduction over the joint mean: clean inputs never reach the full scan."""
    def scan(*args, **kwargs):
        raise AssertionError("the full diagnosis ran on clean inputs")

    monkeypatch.setattr(F, "check_values", scan)
    mu, logvar, logits, mask = experts(dtype=torch.float32)
    mu[1][~mask[1]] = float("nan")  # masked experts may hold anything
    F.poe(mu, logvar, mask)
    F.gpoe(mu, logvar, logits, mask)
    gf.GPoE(3, 5, credibility="global")(mu, logvar, mask, return_weights=True)


@pytest.mark.parametrize("fuse", [lambda mu, lv, lg, mask: F.poe(mu, lv, mask),
                                  lambda mu, lv, lg, mask: F.gpoe(mu, lv, lg, mask)], ids=["poe", "gpoe"])
@pytest.mark.parametrize("backend_name", ["kernel", "torch"])
def test_every_value_error_reaches_the_joint_mean(fuse, backend_name, monkeypatch):
    """What the value checks must catch makes the joint mean NaN on both backends, so the one
    reduction cannot miss it."""
    if backend_name == "kernel" and not gf.extension_available():
        pytest.skip("extension not built")
    mu, logvar, logits, mask = experts(dtype=torch.float32)
    cases = []
    for name in ("mu", "logvar", "logits"):
        values = {"mu": mu.clone(), "logvar": logvar.clone(), "logits": logits.clone()}
        values[name][0, 2, 3] = float("nan")
        cases.append((values["mu"], values["logvar"], values["logits"], mask))
    empty = mask.clone()
    empty[:, 4] = False
    cases.append((mu, logvar, logits, empty))
    for case in cases:
        joint = _reference.fuse(*case) if backend_name == "torch" else gf.ops.fuse(*case, False)
        assert torch.isnan(joint[0].sum())


def test_default_value_checks_run_where_they_need_no_synchronisation():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gf.validation_enabled(None, cpu) and not gf.validation_enabled(None, cuda)
    assert gf.validation_enabled(True, cuda) and not gf.validation_enabled(False, cpu)
    try:
        gf.set_validation(True)
        assert gf.validation_enabled(None, cuda)
        gf.set_validation(False)
        assert not gf.validation_enabled(None, cpu)
    finally:
        gf.set_validation(None)
    assert gf.validation_enabled(None, cpu) and not gf.validation_enabled(None, cuda)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_default_path_never_synchronises():
    mu, logvar, logits, mask = (t.cuda() for t in experts(dtype=torch.float32))
    fusion = randomise(gf.GPoE(3, 5, [4, 4, 4])).cuda()
    features = [torch.randn(6, 4, device="cuda") for _ in range(3)]
    mu.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        joint, alpha = fusion(mu, logvar, mask, features, return_weights=True)
        (joint.mu.sum() + joint.logvar.sum() + alpha.sum()).backward()
        F.poe(mu, logvar, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
