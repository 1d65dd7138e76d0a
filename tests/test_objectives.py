"""The cross-modal objective (paper Eq. 12-16) trains a tiny two-modality problem with each fusion."""

import pytest
import torch
from torch import nn

import gpoe_fusion as gf
from gpoe_fusion.likelihoods import chamfer_distance, cross_entropy, squared_error

D = 4


class Encoder(nn.Module):
    def __init__(self, d_in):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU())
        self.mu, self.logvar = nn.Linear(32, D), nn.Linear(32, D)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h), h


def toy_data(n=256, seed=0):
    """A shared 2-d cause seen by two noisy 'sensors'; the target is a function of the cause."""
    g = torch.Generator().manual_seed(seed)
    cause = torch.randn(n, 2, generator=g)
    x = torch.cat([cause, cause.sin()], 1) + 0.05 * torch.randn(n, 4, generator=g)
    aux = cause @ torch.randn(2, 6, generator=g) + 0.05 * torch.randn(n, 6, generator=g)
    y = torch.stack([cause[:, 0] * cause[:, 1], cause[:, 0] - cause[:, 1]], 1)
    return x, aux, y


def make(fusion_name):
    torch.manual_seed(0)
    encoders = nn.ModuleDict({"x": Encoder(4), "aux": Encoder(6)})
    fusion = {"poe": gf.PoE(), "gpoe": gf.GPoE(2, D, [32, 32], hidden=(16,)), "moe": gf.MoE()}[fusion_name]
    decoders = {"y": nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 2)),
                "aux": nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 6))}
    objective = gf.CrossModalObjective(fusion, decoders, {"y": squared_error, "aux": squared_error}, beta=0.01)
    return encoders, objective


def step(encoders, objective, x, aux, y, mask=None, return_weights=False):
    mx, lx, hx = encoders["x"](x)
    ma, la, ha = encoders["aux"](aux)
    return objective({"x": (mx, lx), "aux": (ma, la)}, {"y": y, "aux": aux}, mask=mask, features={"x": hx, "aux": ha},
                     return_weights=return_weights)


@pytest.mark.parametrize("fusion_name", ["poe", "gpoe", "moe"])
def test_tiny_problem_trains(fusion_name):
    x, aux, y = toy_data()
    encoders, objective = make(fusion_name)
    params = list(encoders.parameters()) + list(objective.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(150):
        out = step(encoders, objective, x, aux, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.4 * first, (first, last)
    assert all(torch.isfinite(v) for v in out.terms.values())


def test_product_objective_terms_follow_eq_12_to_15():
    x, aux, y = toy_data(8)
    encoders, objective = make("gpoe")
    out = step(encoders, objective, x, aux, y, return_weights=True)
    expected = {f"rec/{s}->{d}" for s in ("joint", "x", "aux") for d in ("y", "aux")} | {"kl/x", "kl/aux", "loss"}
    assert set(out.terms) == expected
    rec = sum(v for k, v in out.terms.items() if k.startswith("rec/"))
    kl = out.terms["kl/x"] + out.terms["kl/aux"]
    torch.testing.assert_close(out.loss.detach(), rec + 0.01 * kl)
    assert out.weights.shape == (2, 8, D)
    mx, lx, _ = encoders["x"](x)
    torch.testing.assert_close(out.terms["kl/x"], gf.Gaussian(mx, lx).kl_standard_normal().mean().detach())


def test_mixture_objective_terms_follow_eq_16():
    x, aux, y = toy_data(8)
    encoders, objective = make("moe")
    out = step(encoders, objective, x, aux, y, return_weights=True)
    assert set(out.terms) == {f"rec/{s}->{d}" for s in ("x", "aux") for d in ("y", "aux")} | {"kl/mixture", "loss"}
    assert isinstance(out.joint, gf.GaussianMixture)
    torch.testing.assert_close(out.weights, torch.full_like(out.weights, 0.5))  # the mixture weights
    objective.kl = "components"
    torch.manual_seed(1)
    out = step(encoders, objective, x, aux, y)
    mx, lx, _ = encoders["x"](x)
    ma, la, _ = encoders["aux"](aux)
    expected = 0.5 * (gf.Gaussian(mx, lx).kl_standard_normal() + gf.Gaussian(ma, la).kl_standard_normal()).mean()
    torch.testing.assert_close(out.terms["kl/mixture"], expected.detach())


@pytest.mark.parametrize("fusion_name", ["poe", "gpoe", "moe"])
def test_missing_modality_contributes_nothing(fusion_name):
    x, aux, y = toy_data(6)
    encoders, objective = make(fusion_name)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    torch.manual_seed(5)
    a = step(encoders, objective, x, aux, y, mask)
    garbage = aux.clone()
    garbage[:3] = 1e6  # what the aux encoder makes of it must not matter for the masked rows
    mx, lx, hx = encoders["x"](x)
    ma, la, ha = encoders["aux"](garbage)
    torch.manual_seed(5)
    b = objective({"x": (mx, lx), "aux": (ma, la)}, {"y": y, "aux": aux}, mask=mask, features={"x": hx, "aux": ha})
    # gPoE too: a row with one present expert gives it alpha = 1 whatever the credibility net says.
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("fusion_name", ["poe", "gpoe", "moe"])
def test_the_noise_source_gives_every_reparameterised_draw(fusion_name):
    """``noise`` is asked for every draw, with the batch on the second-to-last axis; one that
    calls torch.randn gives the default's loss, and the latents take what it returns."""
    x, aux, y = toy_data(6)
    encoders, objective = make(fusion_name)
    torch.manual_seed(5)
    default = step(encoders, objective, x, aux, y)
    shapes = []

    def recorded_randn(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.randn(shape, dtype=dtype, device=device)

    objective.noise = recorded_randn
    torch.manual_seed(5)
    assert torch.equal(step(encoders, objective, x, aux, y).loss, default.loss)
    assert shapes == ([(2, 1, 6, D)] if fusion_name == "moe" else [(6, D), (2, 6, D)])
    objective.noise = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    assert not torch.equal(step(encoders, objective, x, aux, y).loss, default.loss)
    joint = gf.Gaussian(torch.zeros(6, D), torch.zeros(6, D))
    with pytest.raises(ValueError, match="not both"):
        joint.rsample(generator=torch.Generator(), noise=objective.noise)
    with pytest.raises(ValueError, match=r"noise: expected draws of shape \(6, 4\)"):
        joint.rsample(noise=lambda shape, dtype, device: torch.zeros(3))


def test_objective_rejects_mismatched_configuration():
    with pytest.raises(ValueError, match="likelihoods: keys"):
        gf.CrossModalObjective(gf.PoE(), {"y": nn.Identity()}, {"z": squared_error})
    with pytest.raises(ValueError, match="weights:"):
        gf.CrossModalObjective(gf.PoE(), {"y": nn.Identity()}, {"y": squared_error}, weights={"q": 1.0})
    objective = gf.CrossModalObjective(gf.PoE(), {"y": nn.Identity()}, {"y": squared_error})
    with pytest.raises(ValueError, match=r"targets: missing \['y'\]"):
        objective({"x": (torch.zeros(2, 3), torch.zeros(2, 3))}, {})


def test_chamfer_distance_is_the_min_over_all_pairs_in_value_and_gradient():
    """Against the definition in float64: every pairwise squared distance, min in both directions."""
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 30, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randn(4, 50, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    pairs = (pred.unsqueeze(2) - target.unsqueeze(1)).square().sum(-1)  # [B, P, Q]
    reference = pairs.min(2).values.mean(1) + pairs.min(1).values.mean(1)
    weights = torch.rand(4, dtype=torch.float64, generator=generator)
    expected = torch.autograd.grad((reference * weights).sum(), (pred, target))
    value = chamfer_distance(pred, target)
    torch.testing.assert_close(value, reference)
    for got, want in zip(torch.autograd.grad((value * weights).sum(), (pred, target)), expected):
        torch.testing.assert_close(got, want)


def test_likelihoods():
    pred = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    # pred -> target nearest: 0, 0 ; target -> pred nearest: 0, 4, 0
    torch.testing.assert_close(chamfer_distance(pred, target), torch.tensor([0.0 + 4.0 / 3.0]))
    torch.testing.assert_close(squared_error(torch.ones(2, 3), torch.zeros(2, 3)), torch.tensor([3.0, 3.0]))
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 10.0
    target = torch.tensor([[[1, 255]]])
    expected = torch.nn.functional.cross_entropy(logits[..., :1], target[..., :1])
    torch.testing.assert_close(cross_entropy(logits, target, ignore_index=255), expected.reshape(1))


class Recording(nn.Module):
    """A fusion layer that records what it is asked for (return_weights) and passes the call on."""

    def __init__(self, fusion):
        super().__init__()
        self.fusion, self.asked = fusion, []

    def forward(self, mu, logvar, mask=None, features=None, return_weights=False):
        self.asked.append(return_weights)
        return self.fusion(mu, logvar, mask, features, return_weights=return_weights)


@pytest.mark.parametrize("fusion_name", ["poe", "gpoe", "moe"])
def test_the_fusion_is_asked_for_its_weights_only_when_they_are_wanted(fusion_name):
    x, aux, y = toy_data(8)
    encoders, objective = make(fusion_name)
    objective.fusion = Recording(objective.fusion)
    torch.manual_seed(2)
    plain = step(encoders, objective, x, aux, y)
    torch.manual_seed(2)
    weighted = step(encoders, objective, x, aux, y, return_weights=True)
    assert objective.fusion.asked == [False, True]
    assert plain.weights is None and weighted.weights.shape == (2, 8, D)
    torch.testing.assert_close(weighted.weights.sum(0), torch.ones(8, D))
    assert torch.equal(plain.loss, weighted.loss)  # the weights change nothing else


def test_fusion_weights_are_each_modalitys_weight_and_mopoe_marginalises_its_subsets():
    x, aux, y = toy_data(8)
    encoders, objective = make("gpoe")
    (mx, lx, hx), (ma, la, ha) = encoders["x"](x), encoders["aux"](aux)
    posteriors, features = {"x": (mx, lx), "aux": (ma, la)}, {"x": hx, "aux": ha}
    _, alpha = objective.fusion(torch.stack([mx, ma]), torch.stack([lx, la]), None, [hx, ha], return_weights=True)
    torch.testing.assert_close(objective.fusion_weights(posteriors, features=features), alpha)
    # MoPoE of 3 modalities, modality c missing in rows 0-3: the present subsets are {a}, {b}, {a, b} there
    # (a: 2 of 3 subsets, b likewise: 1/2 each) and all 7 elsewhere (each modality in 4 of 7: 1/3 each).
    mopoe = gf.CrossModalObjective(gf.MoPoE(), {"y": nn.Linear(D, 2)}, {"y": squared_error})
    mu, logvar = torch.randn(3, 8, D), torch.randn(3, 8, D)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, :4] = False
    weights = mopoe.fusion_weights({n: (mu[i], logvar[i]) for i, n in enumerate("abc")}, mask=mask)
    expected = torch.full((3, 8, D), 1 / 3)
    expected[:2, :4], expected[2, :4] = 0.5, 0.0
    torch.testing.assert_close(weights, expected)


def test_each_mixture_takes_its_own_kl_by_default():
    """MoPoE's default regulariser is its own (the components' KL, kl="components"), MoE's the mixture's KL."""
    torch.manual_seed(0)
    mu, logvar, target = torch.randn(2, 6, D), torch.randn(2, 6, D), torch.randn(6, 2)
    posteriors = {"a": (mu[0], logvar[0]), "b": (mu[1], logvar[1])}

    def kl_term(fusion, kl):
        objective = gf.CrossModalObjective(fusion, {"y": nn.Linear(D, 2)}, {"y": squared_error}, kl=kl)
        torch.manual_seed(1)
        return objective(posteriors, {"y": target}).terms["kl/mixture"]

    for fusion, own, other in ((gf.MoPoE(), "components", "mixture"), (gf.MoE(), "mixture", "components")):
        assert torch.equal(kl_term(fusion, None), kl_term(fusion, own))
        assert not torch.equal(kl_term(fusion, None), kl_term(fusion, other))
    with pytest.raises(ValueError, match="kl: expected None, 'mixture' or 'components'"):
        gf.CrossModalObjective(gf.MoE(), {"y": nn.Identity()}, {"y": squared_error}, kl="both")
