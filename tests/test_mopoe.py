"""MoPoE (every subset's product, fused) and entropy credibility, against independent loops."""

from __future__ import annotations

import itertools

import pytest
import torch

import gpoe_fusion as gf
from gpoe_fusion import _reference, ops
from gpoe_fusion import functional as F

BACKENDS = ["auto", "torch"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def experts(m=3, b=7, d=5, dtype=torch.float64, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(m, b, d, generator=g, dtype=torch.float64) * 2
    logvar = (torch.rand(m, b, d, generator=g, dtype=torch.float64) * 2 - 1) * 8
    logits = torch.randn(m, b, d, generator=g, dtype=torch.float64) * 2
    mask = None
    if masked:
        mask = torch.rand(m, b, generator=g) > 0.3
        mask[0] = True
        mu = mu.masked_fill(~mask.unsqueeze(-1), float("nan"))
        logvar = logvar.masked_fill(~mask.unsqueeze(-1), float("nan"))
    return mu.to(dtype), logvar.to(dtype), logits.to(dtype), mask


def loop_over_subsets(mu, logvar, logits, mask, prior):
    """The peers' way, in float64: one poe / gpoe call per subset, over the rows where it is complete."""
    m = mu.shape[0]
    out_mu, out_logvar, present = [], [], []
    for code in range(1, 2**m):
        members = [i for i in range(m) if code >> i & 1]
        complete = torch.ones(mu.shape[1], dtype=torch.bool) if mask is None else mask[members].all(0)
        sub = [t[members].double().nan_to_num() for t in (mu, logvar)]
        if logits is None:
            joint = F.poe(*sub, prior_expert=prior, backend="torch")
        else:
            joint = F.gpoe(*sub, logits.expand(mu.shape)[members].double(), prior_expert=prior, backend="torch")
        out_mu.append(joint.mu)
        out_logvar.append(joint.logvar)
        present.append(complete)
    return torch.stack(out_mu), torch.stack(out_logvar), torch.stack(present)


def test_subsets_are_ordered_by_their_bits():
    want = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert _reference.subset_masks(3).tolist() == [[bool(x) for x in row] for row in want]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("logits_shape", ["none", "full", "global"])
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("m", [1, 3, 5])
def test_mopoe_matches_a_float64_loop_over_the_subsets(backend, dtype, logits_shape, prior, m):
    mu, logvar, logits, mask = experts(m=m, dtype=dtype)
    logits = {"none": None, "full": logits, "global": logits[:, :1]}[logits_shape]
    mixture = F.mopoe(mu, logvar, mask, logits, prior, backend=backend)
    want_mu, want_logvar, present = loop_over_subsets(mu, logvar, logits, mask, prior)
    assert mixture.mu.shape == (2**m - 1, 7, 5) and mixture.mu.dtype == dtype
    assert torch.equal(mixture.mask, present) and torch.equal(mixture.subsets, _reference.subset_masks(m))
    tol = TOLERANCE[dtype]
    for got, want in ((mixture.mu, want_mu), (mixture.logvar, want_logvar)):
        got = got.double()[present]
        want = want[present]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())
        assert torch.isfinite(got).all()
    absent = ~present
    assert torch.equal(mixture.mu[absent], torch.zeros_like(mixture.mu[absent]))


def test_mixture_weights_are_uniform_over_present_components():
    mu, logvar, _, mask = experts(m=3)
    mixture, alpha = F.mopoe(mu, logvar, mask, return_weights=True)
    weights = mixture.log_weights.exp()
    present = mixture.mask
    torch.testing.assert_close(weights.sum(0), torch.ones(7, dtype=weights.dtype))
    for row in range(7):
        count = int(present[:, row].sum())
        assert count == 2 ** int(mask[:, row].sum()) - 1
        torch.testing.assert_close(weights[present[:, row], row], torch.full((count,), 1 / count, dtype=weights.dtype))
    assert alpha.shape == mixture.mu.shape
    z = mixture.rsample(2)
    assert z.shape == (7, 2, 7, 5) and torch.isfinite(mixture.log_prob(z[0, 0])).all()


@pytest.mark.parametrize("use_logits", [False, True])
def test_gradients_match_the_reference_and_skip_masked_experts(use_logits):
    mu, logvar, logits, mask = experts(m=4)
    results = []
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]
        mixture = F.mopoe(leaves[0], leaves[1], mask, leaves[2] if use_logits else None, True, backend=backend)
        g = torch.Generator().manual_seed(3)
        loss = (mixture.mu * torch.randn(mixture.mu.shape, generator=g, dtype=torch.float64)).sum() + (
            mixture.logvar * torch.randn(mixture.mu.shape, generator=g, dtype=torch.float64)).sum()
        results.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    for name, got, want in zip(("mu", "logvar", "logits"), *results):
        assert not got.isnan().any(), f"grad {name} has NaN"
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask])), f"masked experts got a {name} gradient"
        torch.testing.assert_close(got, want, msg=lambda msg: f"grad {name}: {msg}")


@pytest.mark.skipif(not ops.available(), reason="extension not built")
@pytest.mark.parametrize("use_logits", [False, True])
def test_op_gradcheck_gradgradcheck_and_opcheck(use_logits):
    mu, logvar, logits, mask = experts(m=3, b=3, d=4)
    mu, logvar = mu.nan_to_num(0.0), logvar.nan_to_num(0.0)
    leaves = [t.clone().requires_grad_() for t in ((mu, logvar, logits) if use_logits else (mu, logvar))]

    def fused(*args):
        return ops.mopoe(args[0], args[1], args[2] if use_logits else None, mask, True)

    assert torch.autograd.gradcheck(fused, leaves)
    assert torch.autograd.gradgradcheck(fused, leaves)
    torch.library.opcheck(torch.ops.gpoe_fusion.mopoe_forward,
                          (*leaves[:2], leaves[2] if use_logits else None, mask, True))
    s = 2**3 - 1
    torch.library.opcheck(torch.ops.gpoe_fusion.mopoe_backward,
                          (torch.randn(s, 3, 4, dtype=torch.float64), None, mu, logvar,
                           logits if use_logits else None, mask, False, [True, True, use_logits]))


@pytest.mark.skipif(not ops.available(), reason="extension not built")
def test_op_errors_name_the_argument():
    mu = torch.randn(9, 2, 3)
    with pytest.raises(ValueError, match="mu: at most 8 experts"):
        torch.ops.gpoe_fusion.mopoe_forward(mu, mu, None, None, False)
    mu = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match=r"logits: expected shape \[M, N, D\]"):
        torch.ops.gpoe_fusion.mopoe_forward(mu, mu, torch.randn(2, 1, 3), None, False)
    with pytest.raises(ValueError, match=r"grad_joint_mu: expected shape \[S, N, D\]"):
        torch.ops.gpoe_fusion.mopoe_backward(torch.randn(2, 2, 3), None, mu, mu, None, None, False,
                                             [True, True, False])


def test_functional_errors():
    with pytest.raises(ValueError, match="at most 8 experts"):
        F.mopoe(torch.randn(9, 2, 3), torch.randn(9, 2, 3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[:, 1] = False
    with pytest.raises(ValueError, match="mask: 1 batch rows have every expert masked"):
        F.mopoe(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask, prior_expert=True)
    mu = torch.randn(2, 3, 4)
    mu[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="mu: contains NaN"):
        F.mopoe(mu, torch.randn(2, 3, 4))


def test_compile_fullgraph():
    torch._dynamo.reset()
    mu, logvar, logits, mask = experts(m=3, dtype=torch.float32)
    mu, logvar = mu.nan_to_num(0.0), logvar.nan_to_num(0.0)

    def step(mu, logvar, logits):
        mixture = F.mopoe(mu, logvar, mask, logits, True)
        return (mixture.mu ** 2).sum() + mixture.logvar.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (mu, logvar, logits)]
        value = fn(*leaves)
        results.append([value, *torch.autograd.grad(value, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("credibility", [None, "global", "entropy", "joint"])
def test_mopoe_layer_has_the_common_call_form(credibility):
    mu, logvar, _, mask = experts(m=2, dtype=torch.float32)
    features = [torch.randn(7, 4), torch.randn(7, 6)]
    fusion = gf.MoPoE(2, 5, [4, 6], credibility=credibility) if credibility else gf.MoPoE()
    mixture, alpha = fusion(mu, logvar, mask, features, return_weights=True)
    assert isinstance(mixture, gf.GaussianMixture) and mixture.num_components == 3
    assert alpha.shape == (3, 7, 5)
    if credibility == "global":  # at initialisation: uniform logits, each subset's gPoE
        logits = torch.zeros(2, 1, 5)
        torch.testing.assert_close(mixture.mu, F.mopoe(mu, logvar, mask, logits).mu)


# ---- entropy credibility -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_credibility_is_the_normalised_entropy_removed(backend):
    mu, logvar, _, mask = experts(m=3)
    logvar[0, 1] = 3.0  # removes nothing from the prior in any dimension
    logvar[1, 1], mu[1, 1], mask[1, 1] = -4.0, 0.5, True  # expert 1 removes 2 nats: expert 0 gets no weight
    logvar[:, 2] = 1.0  # no expert removes anything in row 2: uniform over the present ones
    fusion = gf.GPoE(3, 5, credibility="entropy", backend=backend)
    joint, alpha = fusion(mu, logvar, mask, return_weights=True)
    removed = (-logvar / 2).clamp_min(0).nan_to_num(0.0) * mask.unsqueeze(-1)
    total = removed.sum(0, keepdim=True)
    uniform = mask.unsqueeze(-1).double() / mask.sum(0).unsqueeze(-1)
    want = torch.where(total > 0, removed / total.clamp_min(1e-300), uniform)
    torch.testing.assert_close(alpha, want)
    assert (alpha[0, 1] < 1e-300).all()
    torch.testing.assert_close(joint.mu, F.gpoe(mu, logvar, fusion.logits(mu, logvar, None, mask), mask).mu)


def test_entropy_temperature_is_learned_and_entropy_joint_adds_a_network():
    mu, logvar, _, _ = experts(m=2, masked=False)
    fusion = gf.GPoE(2, 5, credibility="entropy", learn_temperature=True)
    assert [name for name, _ in fusion.named_parameters()] == ["credibility.log_temperature"]
    joint, alpha = fusion(mu.float(), logvar.float(), return_weights=True)
    (joint.mu.sum() + joint.logvar.sum()).backward()
    assert fusion.credibility.log_temperature.grad is not None
    with torch.no_grad():
        fusion.credibility.log_temperature.fill_(torch.log(torch.tensor(2.0)))
    _, sharper = fusion(mu.float(), logvar.float(), return_weights=True)
    removed = (-logvar.float() / 2).clamp_min(0)
    want = removed**2 / (removed**2).sum(0, keepdim=True)
    present = removed.sum(0) > 0
    torch.testing.assert_close(sharper[:, present], want[:, present])
    combined = gf.GPoE(2, 5, [4, 4], credibility="entropy+joint")
    _, alpha = combined(mu.float(), logvar.float(), features=[torch.randn(7, 4), torch.randn(7, 4)], return_weights=True)
    _, entropy_only = gf.GPoE(2, 5, credibility="entropy")(mu.float(), logvar.float(), return_weights=True)
    torch.testing.assert_close(alpha, entropy_only)  # the joint network's last layer starts at zero
    with pytest.raises(ValueError, match="learn_temperature"):
        gf.GPoE(2, 5, credibility="global", learn_temperature=True)


# ---- the MoPoE objective ---------------------------------------------------------------------------

def test_mopoe_objective_matches_a_slow_reference():
    """Stratified draws of every present subset posterior, weighted by the mixture weights, and the
    mixture-weighted KL of the subset posteriors (kl="components"), computed by hand."""
    torch.manual_seed(0)
    m, b, d = 3, 6, 4
    mu, logvar = torch.randn(m, b, d, dtype=torch.float64), torch.randn(m, b, d, dtype=torch.float64)
    mask = torch.rand(m, b) > 0.3
    mask[0] = True
    decoder = torch.nn.Linear(d, 2).double()
    target = torch.randn(b, 2, dtype=torch.float64)
    objective = gf.CrossModalObjective(gf.MoPoE(), {"y": decoder}, {"y": gf.likelihoods.squared_error},
                                       beta=0.5, kl="components", num_samples=2)
    names = ["a", "b", "c"]
    torch.manual_seed(1)
    out = objective({n: (mu[i], logvar[i]) for i, n in enumerate(names)}, {"y": target}, mask=mask, return_weights=True)

    torch.manual_seed(1)
    rec = kl = 0.0
    eps = torch.randn(2**m - 1, 2, b, d, dtype=torch.float64)
    for c, code in enumerate(range(1, 2**m)):
        members = [i for i in range(m) if code >> i & 1]
        complete = mask[members].all(0)
        weight = complete.double() / (2.0 ** mask.sum(0).double() - 1)
        joint = F.poe(mu[members], logvar[members], backend="torch")
        for draw in range(2):
            z = joint.mu + torch.exp(0.5 * joint.logvar) * eps[c, draw]
            rec = rec + (gf.likelihoods.squared_error(decoder(z), target) * weight).sum() / b / 2
        kl = kl + (joint.kl_standard_normal() * weight).sum() / b
    torch.testing.assert_close(out.loss, rec + 0.5 * kl)
    assert "rec/a+c->y" in out.terms and out.weights.shape == (m, b, d)  # per modality, from the 7 subsets'
    torch.testing.assert_close(out.weights.sum(0), torch.ones(b, d, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_logits", [False, True])
@pytest.mark.parametrize("m", [2, 4, 6])
def test_cuda_mopoe_matches_cpu(dtype, use_logits, m):
    mu, logvar, logits, mask = experts(m=m, b=33, d=19, dtype=dtype)
    outs = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (mu, logvar, logits)]
        mixture = F.mopoe(leaves[0], leaves[1], mask.to(device), leaves[2] if use_logits else None, True)
        loss = (mixture.mu.float() ** 2).sum() + mixture.logvar.float().sum()
        grads = torch.autograd.grad(loss, leaves[: 3 if use_logits else 2])
        outs.append([t.detach().cpu().double().nan_to_num() for t in (mixture.mu, mixture.logvar, *grads)])
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("m", [1, 4, 8])
def test_components_are_every_nonempty_subset_once(m):
    want = {frozenset(c) for r in range(1, m + 1) for c in itertools.combinations(range(m), r)}
    rows = [frozenset(row.nonzero().squeeze(1).tolist()) for row in _reference.subset_masks(m)]
    assert len(rows) == len(want) == 2**m - 1 and set(rows) == want
