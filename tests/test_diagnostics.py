"""Credibility diagnostics against hand-computed cases and torchmetrics."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from gpoe_fusion import diagnostics


def test_auroc_hand_computed():
    positive = torch.tensor([True, True, False, False])
    assert diagnostics.auroc(torch.tensor([3.0, 4.0, 1.0, 2.0]), positive) == 1.0
    assert diagnostics.auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), positive) == 0.0
    # pairs (pos, neg): (3 > 1), (3 > 2)... with one tie: 3 of 4 pairs won, 1 tied -> 3.5 / 4
    assert diagnostics.auroc(torch.tensor([3.0, 2.0, 1.0, 2.0]), positive) == pytest.approx(0.875)
    assert math.isnan(diagnostics.auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))


def test_auroc_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=g).float() / 20  # many ties; in [0, 1], as torchmetrics expects
    labels = torch.rand(300, generator=g) > 0.6
    assert diagnostics.auroc(scores, labels) == pytest.approx(float(binary_auroc(scores, labels.long())), abs=1e-6)


def test_precision_share_and_effective_experts_hand_computed():
    alpha = torch.tensor([[[0.5]], [[0.5]]])
    logvar = torch.tensor([[[0.0]], [[math.log(3.0)]]])  # precisions 1 and 1/3
    share = diagnostics.precision_share(alpha, logvar)
    torch.testing.assert_close(share[:, 0, 0], torch.tensor([0.75, 0.25]))
    assert diagnostics.effective_experts(share).item() == pytest.approx(1 / (0.75**2 + 0.25**2))
    assert diagnostics.effective_experts(torch.full((4, 1, 1), 0.25)).item() == pytest.approx(4.0)
    mask = torch.tensor([[True], [False]])
    torch.testing.assert_close(diagnostics.precision_share(alpha, logvar, mask)[:, 0, 0], torch.tensor([1.0, 0.0]))


def test_credibility_report_separates_corrupted_samples():
    flags = torch.tensor([True, False, True, False, False, True])
    alpha_rgb = torch.where(flags, 0.2, 0.7).unsqueeze(-1).expand(6, 3)
    alpha = torch.stack([alpha_rgb, 1 - alpha_rgb])
    logvar = torch.zeros(2, 6, 3)
    report = diagnostics.credibility_report(alpha, logvar, {"rgb": flags}, ["rgb", "depth"])
    rgb = report["rgb"]
    assert rgb["auroc_alpha"] == 1.0 and rgb["auroc_share"] == 1.0
    assert rgb["alpha_clean"] == pytest.approx(0.7) and rgb["alpha_corrupted"] == pytest.approx(0.2)
    assert rgb["samples"] == 6
    # Uninformative alpha: 0.5.
    flat = diagnostics.credibility_report(torch.full((2, 6, 3), 0.5), logvar, {"rgb": flags}, ["rgb", "depth"])
    assert flat["rgb"]["auroc_alpha"] == 0.5 and flat["rgb"]["effective_experts"] == pytest.approx(2.0)
    # Samples without the modality do not count.
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    assert diagnostics.credibility_report(alpha, logvar, {"rgb": flags}, ["rgb", "depth"], mask)["rgb"]["samples"] == 4
    with pytest.raises(ValueError, match="corrupted"):
        diagnostics.credibility_report(alpha, logvar, {"ir": flags}, ["rgb", "depth"])


def test_credibility_report_of_a_fusions_own_weights():
    # PoE: alpha uniform, its own weight the precision share; the corrupted RGB expert is wider.
    flags = torch.tensor([True, False, True, False])
    logvar = torch.stack([torch.where(flags, 2.0, 0.0).unsqueeze(-1).expand(4, 3), torch.zeros(4, 3)])
    uniform = torch.full((2, 4, 3), 0.5)
    shares = diagnostics.precision_share(uniform, logvar)
    rgb = diagnostics.credibility_report(uniform, logvar, {"rgb": flags}, ["rgb", "depth"], weights=shares)["rgb"]
    assert rgb["auroc"] == 1.0 and rgb["auroc_share"] == 1.0 and rgb["auroc_alpha"] == 0.5
    share_corrupted = 1 / (1 + math.exp(2.0))  # precisions e^-2 and 1
    assert rgb["weight_clean"] == pytest.approx(0.5) and rgb["weight_corrupted"] == pytest.approx(share_corrupted)
    assert rgb["alpha_clean"] == rgb["alpha_corrupted"] == 0.5
    expected = (2 * 2.0 + 2 / (share_corrupted**2 + (1 - share_corrupted) ** 2)) / 4
    assert rgb["effective_experts"] == pytest.approx(expected)  # of the weights, not of alpha
    # Without weights they are alpha, as before.
    plain = diagnostics.credibility_report(uniform, logvar, {"rgb": flags}, ["rgb", "depth"])["rgb"]
    assert plain["auroc"] == plain["auroc_alpha"] == 0.5 and plain["weight_clean"] == plain["alpha_clean"]
    with pytest.raises(ValueError, match="weights: shape"):
        diagnostics.credibility_report(uniform, logvar, {"rgb": flags}, ["rgb", "depth"], weights=shares[:, :2])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_diagnostics_work_on_tensors_of_any_device(device):
    """Every measure on ``device`` (flags and mask may stay on the CPU) equals the CPU result."""
    g = torch.Generator().manual_seed(3)
    alpha = torch.softmax(torch.randn(2, 40, 5, generator=g), dim=0)
    logvar = torch.randn(2, 40, 5, generator=g)
    mask = torch.rand(2, 40, generator=g) > 0.2
    mask[0] |= ~mask[1]
    flags = {"rgb": torch.rand(40, generator=g) > 0.5}
    scores = torch.randint(0, 6, (40,), generator=g).double()  # ties
    want_auroc = diagnostics.auroc(scores, flags["rgb"])
    want = diagnostics.credibility_report(alpha, logvar, flags, ["rgb", "depth"], mask=mask)
    on = lambda t: t.to(device)  # noqa: E731
    assert diagnostics.auroc(on(scores), flags["rgb"]) == pytest.approx(want_auroc, abs=1e-12)
    assert diagnostics.auroc(on(scores), on(flags["rgb"])) == pytest.approx(want_auroc, abs=1e-12)
    got = diagnostics.credibility_report(on(alpha), on(logvar), flags, ["rgb", "depth"], mask=mask)
    assert got.keys() == want.keys()
    for key, value in want["rgb"].items():
        assert got["rgb"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    share = diagnostics.precision_share(on(alpha), on(logvar), on(mask))
    assert share.device.type == device
    torch.testing.assert_close(share.cpu(), diagnostics.precision_share(alpha, logvar, mask))
    assert diagnostics.effective_experts(share).device.type == device
