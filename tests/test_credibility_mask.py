"""The credibility networks read the modality mask: a missing modality's features reach no output."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gpoe_fusion as gf
from gpoe_fusion.credibility import FeatureStandardizer

DIMS = (3, 4, 5)
GARBAGE = [1e30, -1e4, float("nan"), float("inf"), -float("inf")]


def features(batch=(6,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2.0 + torch.randn(*batch, dim, generator=g) for dim in DIMS]


def mask_of(batch=(6,)):
    """Modality 1 missing in two rows, modality 0 in one: every row keeps a modality."""
    mask = torch.ones((len(DIMS),) + batch, dtype=torch.bool)
    flat = mask.view(len(DIMS), -1)
    flat[1, 0] = flat[1, 3] = False
    flat[0, -1] = False
    return mask


def spoil(feats, mask, value):
    """The features with ``value`` in every masked row."""
    return [torch.where(m.unsqueeze(-1), f, torch.full_like(f, value)) for f, m in zip(feats, mask)]


def trained_net(kind, seed=0):
    """A network with random (non-zero) last layers and running statistics moved by a few
    training batches with random masks."""
    torch.manual_seed(seed)
    net = {"joint": gf.JointCredibility, "independent": gf.IndependentCredibility}[kind](DIMS, 2, hidden=(8,))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for step in range(3):
            mask = torch.rand(len(DIMS), 8, generator=g) > 0.3
            net(spoil(features((8,), seed=10 + step), mask, float("nan")), mask)
    return net


def buffers(net):
    return {name: b.clone() for name, b in net.named_buffers()}


@pytest.mark.parametrize("kind", ["joint", "independent"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch", [(6,), (2, 3)])
def test_masked_features_reach_no_output_and_no_statistic(kind, training, batch):
    net = trained_net(kind).train(training)
    feats, mask = features(batch), mask_of(batch)
    ref_net = copy.deepcopy(net)
    with torch.no_grad():
        ref = ref_net(feats, mask)
    assert ref.shape == (len(DIMS),) + batch + (2,) and torch.isfinite(ref).all()
    for value in GARBAGE:
        garbage_net = copy.deepcopy(net)
        with torch.no_grad():
            out = garbage_net(spoil(feats, mask, value), mask)
        assert torch.equal(out, ref), value
        for name, b in buffers(garbage_net).items():
            assert torch.equal(b, buffers(ref_net)[name]), (value, name)
    if training:
        assert any(not torch.equal(b, net.get_buffer(n)) for n, b in buffers(ref_net).items())


@pytest.mark.parametrize("kind", ["joint", "independent"])
def test_without_the_mask_the_garbage_would_leak(kind):
    """The test above can fail: unmasked, one row's features move the other rows' logits."""
    net = trained_net(kind)
    feats, mask = features(), mask_of()
    with torch.no_grad():
        a = copy.deepcopy(net)(feats)
        b = copy.deepcopy(net)(spoil(feats, mask, 1e4))
    assert not torch.allclose(a[:, 1:5], b[:, 1:5])


def test_joint_logits_depend_on_which_modalities_are_present():
    net = trained_net("joint").eval()
    feats = features()
    feats[2][0] = net.norms[2].running_mean  # standardises to exactly the zeros a masked modality gets
    mask = torch.ones(len(DIMS), 6, dtype=torch.bool)
    absent = mask.clone()
    absent[2, 0] = False
    with torch.no_grad():
        full, partial = net(feats, mask), net(feats, absent)
    assert torch.equal(full[:, 1:], partial[:, 1:])  # eval: rows are independent
    assert not torch.allclose(full[:2, 0], partial[:2, 0])  # only the mask input differs


@pytest.mark.parametrize("kind", ["joint", "independent"])
@pytest.mark.parametrize("training", [True, False])
def test_masked_features_get_exactly_zero_gradient(kind, training):
    net = trained_net(kind).train(training)
    mask = mask_of()
    feats = [f.requires_grad_() for f in spoil(features(), mask, float("nan"))]
    feats[1].data[3] = float("inf")
    net(feats, mask).square().sum().backward()
    for f, m in zip(feats, mask):
        assert torch.isfinite(f.grad).all()
        assert (f.grad[~m] == 0).all()
        assert (f.grad[m] != 0).any()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_statistics_are_over_present_rows_only():
    norm = FeatureStandardizer(3)
    x = 5.0 + 2.0 * torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    present = torch.tensor([True, False] * 5)
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    expected = F.batch_norm(x[present], expected_mean, expected_var, training=True, momentum=0.1, eps=1e-5)
    out = norm(torch.where(present[:, None], x, torch.nan), present)
    torch.testing.assert_close(out[present], expected)
    assert (out[~present] == 0).all()
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)  # unbiased, as batch norm


@pytest.mark.parametrize("rows_present", [0, 1])
def test_too_few_present_rows_use_and_keep_the_running_statistics(rows_present):
    norm = FeatureStandardizer(3)
    norm(torch.randn(8, 3) * 3 + 1)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(4, 3)
    present = torch.arange(4) < rows_present
    out = norm(x, present)
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    torch.testing.assert_close(out[present], (x[present] - mean) / (var + 1e-5).sqrt())
    assert (out[~present] == 0).all()
    assert norm(x[:1]).shape == (1, 3)  # one row in training mode: running statistics
    assert torch.equal(norm.running_mean, mean)


@pytest.mark.parametrize("kind", ["joint", "independent"])
def test_mask_errors_name_the_mask(kind):
    net = trained_net(kind)
    feats = features()
    mask = mask_of()
    with pytest.raises(TypeError, match="mask"):
        net(feats, mask.float())
    with pytest.raises(TypeError, match="mask"):
        net(feats, [[True] * 6] * 3)
    with pytest.raises(ValueError, match=r"mask: expected shape \[M, \*batch\] = \(3, 6\)"):
        net(feats, mask[:2])
    with pytest.raises(ValueError, match="mask"):
        net(feats, mask[:, :5])
    with pytest.raises(ValueError, match="mask"):
        net(feats, mask.view(3, 2, 3))


def test_global_credibility_accepts_and_ignores_the_mask():
    net = gf.GlobalCredibility(3, 2)
    assert net(batch_ndim=2).shape == (3, 1, 1, 2)
    assert torch.equal(net(features(), batch_ndim=1, mask=mask_of()), net(batch_ndim=1))


@pytest.mark.parametrize("training", [True, False])
def test_joint_credibility_compiles_without_graph_breaks(training):
    torch._dynamo.reset()
    eager = trained_net("joint").train(training)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    mask = mask_of()
    mask[2] = False  # absent in every row: the running-statistics branch, taken without `if`
    feats = spoil(features(), mask, float("nan"))
    torch.testing.assert_close(compiled(feats, mask), eager(feats, mask), rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(eager.named_buffers(), compiled_net.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_bfloat16_features_get_float32_statistics():
    """GPU autocast gives the credibility networks bfloat16 features; their statistics are float32
    anyway: features of mean 10 give running means of 10.000 (in bfloat16 they stall at 9.75-9.875)."""
    g = torch.Generator().manual_seed(0)
    exact, rounded = FeatureStandardizer(4), FeatureStandardizer(4)
    for _ in range(100):
        x = 10.0 + torch.randn(64, 4, generator=g)
        x16 = x.bfloat16()
        out_exact = exact(x16.float())
        out = rounded(x16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, out_exact.bfloat16(), rtol=0, atol=0)
    assert rounded.running_mean.dtype == torch.float32
    torch.testing.assert_close(rounded.running_mean, exact.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(rounded.running_var, exact.running_var, rtol=0, atol=0)
    assert (rounded.running_mean - 10.0).abs().max() < 0.05


def test_credibility_under_cpu_bfloat16_autocast_matches_float32():
    """A GPoE layer's alpha under bfloat16 autocast against float32, with trained-like statistics."""
    torch.manual_seed(0)
    layer = gf.GPoE(len(DIMS), 6, list(DIMS), hidden=(8,))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(len(DIMS), 32, 6, generator=g), torch.randn(len(DIMS), 32, 6, generator=g)
    # As an encoder under autocast makes them: bfloat16 (the float32 reference gets the same values).
    feats16 = [(10.0 + torch.randn(32, dim, generator=g)).bfloat16() for dim in DIMS]
    feats = [f.float() for f in feats16]
    reference = copy.deepcopy(layer)
    for _ in range(20):  # running statistics under autocast and in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(mu, logvar, features=feats16)
        reference(mu, logvar, features=feats)
    for got, want in zip(buffers(layer).values(), buffers(reference).values()):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    layer.eval(), reference.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, alpha = layer(mu, logvar, features=feats16, return_weights=True)
    _, alpha_exact = reference(mu, logvar, features=feats, return_weights=True)
    torch.testing.assert_close(alpha.float(), alpha_exact, rtol=0, atol=0.03)
