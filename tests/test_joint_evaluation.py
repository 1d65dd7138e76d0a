"""Joint inference of the pipelines' evaluation (``common.evaluation.predictions``) against a float64 reference: every
prediction of every metric group at every test level, computed here from the whole corrupted set at once and fused
by the textbook formulas (tests/oracle.py), not through the pass-per-level and the cached clean posteriors."""

import numpy as np
import pytest
import torch
from torch.utils.data import StackDataset

import handpose_rhd
from common import data
from common.evaluation import PREDICTIONS, predictions
from oracle import weighted_product

SAMPLES = 6
ARGS = ["--crop-size", "32", "--num-points", "16", "--latent-dim", "4", "--rgb-width", "8", "--pel-width", "16",
        "--grid-size", "4", "--fold-hidden", "16", "--keypoint-hidden", "16", "--eval-batch-size", "4",
        "--workers", "0", "--test-corruption", "0", "0.5", "--test-point-noise", "0", "0.7", "--seed", "3"]


class Collected:
    """A score that keeps the predictions it is given, in order."""

    def __init__(self):
        self.parts = []

    def update(self, prediction: torch.Tensor, batch: dict) -> None:
        self.parts.append(prediction)

    def compute(self) -> dict:
        return {"prediction": torch.cat(self.parts)}


def reference_joint(fusion: str, mu: np.ndarray, logvar: np.ndarray, mask: np.ndarray, logits) -> np.ndarray:
    """The mean of the fused posterior [B, D] of experts mu, logvar [2, B, D] with mask [2, B]: the (weighted) product
    of the present experts, or for the mixtures the mean of their present components (MoE: the experts; MoPoE: the
    products of the subsets {rgb}, {points}, {rgb, points})."""
    if fusion in ("poe", "gpoe"):
        return weighted_product(mu, logvar, logits, mask)[0]
    subsets = [[True, False], [False, True]] + ([[True, True]] if fusion == "mopoe" else [])
    total, count = np.zeros(mu.shape[1:]), np.zeros(mu.shape[1:2] + (1,))
    for members in subsets:
        members = np.array(members)[:, None]
        present = (mask | ~members).all(0)[:, None]  # every member of the subset present
        with np.errstate(divide="ignore", invalid="ignore"):  # the product of no expert (0 / 0): weighted 0
            product = weighted_product(mu, logvar, None, mask & members)[0]
        total += np.where(present, product, 0.0)
        count += present
    return total / count


@pytest.mark.parametrize("fusion, kind", [("poe", "pixels"), ("gpoe", "pixels"), ("moe", "pixels"),
                                          ("mopoe", "pixels"), ("poe", "desync"), ("gpoe", "desync")])
def test_every_prediction_of_every_group_is_the_decoded_fused_mean(tmp_path, fusion, kind):
    args = handpose_rhd.parse_args(ARGS + ["--fusion", fusion, "--corruption-kind", kind, "--out", str(tmp_path)])
    model = handpose_rhd.build_model(args).eval()
    generator = torch.Generator().manual_seed(0)
    dataset = StackDataset(rgb=torch.rand(SAMPLES, 3, 32, 32, generator=generator),
                           points=0.3 * torch.randn(SAMPLES, 16, 3, generator=generator),
                           keypoints=torch.randn(SAMPLES, 21, 3, generator=generator), scale=torch.ones(SAMPLES))
    got = predictions(model, dataset, args, torch.device("cpu"), "keypoints", Collected)

    decoder = model.objective.decoders["keypoints"]
    alpha = {}
    for group, (what, corrupted) in PREDICTIONS.items():
        # With desync a level of either modality is a fraction of the samples: --test-corruption's.
        levels = args.test_point_noise if corrupted == "points" and kind == "pixels" else args.test_corruption
        assert list(got[group]) == [str(level) for level in levels]
        for level in levels:
            corrupted_set = data.test_corruption(dataset, level, args.seed, corrupted, kind)
            items = [corrupted_set[i] for i in range(SAMPLES)]
            with torch.no_grad():
                encoded = [model.encoders[m](torch.stack([item[m] for item in items])) for m in ("rgb", "points")]
                mu, logvar = (torch.stack([e[part] for e in encoded]) for part in (0, 1))
                flagged = np.array([[bool(item.get(f"corrupted_{m}", False)) for item in items]
                                    for m in ("rgb", "points")])
                # The one modality corrupted: in every test sample, or with desync a fraction level of them.
                assert flagged.sum() == round(SAMPLES * (level if kind == "desync" else level > 0))
                assert not flagged[1 - ("rgb", "points").index(corrupted)].any()
                mask = np.ones_like(flagged) if what == "joint" else ~flagged
                logits = None
                if fusion == "gpoe":
                    logits = model.objective.fusion.logits(mu, logvar, [e[2] for e in encoded],
                                                           torch.from_numpy(mask)).double().numpy()
                if what in ("rgb", "points"):
                    z = encoded[("rgb", "points").index(what)][0].double().numpy()
                else:
                    z = reference_joint(fusion, mu.double().numpy(), logvar.double().numpy(), mask, logits)
                expected = decoder(torch.from_numpy(z).float())
            torch.testing.assert_close(got[group][str(level)]["prediction"], expected, atol=2e-5, rtol=1e-4)
            if fusion == "gpoe" and group == "metrics_joint":
                weights = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
                alpha[str(level)] = np.broadcast_to(weights, mu.shape).mean((1, 2))
    if fusion == "gpoe":
        assert list(got["alpha"]) == ["0.0", "0.5"]
        for level, expected in alpha.items():
            assert [got["alpha"][level][m] for m in ("rgb", "points")] == pytest.approx(expected, abs=1e-6)
    else:
        assert got["alpha"] is None
    # The oracle masks the corrupted RGB: there it is the points alone; and the joint is neither modality alone.
    corrupted = data.test_corruption(dataset, 0.5, args.seed, kind=kind).corrupted
    torch.testing.assert_close(got["metrics_oracle"]["0.5"]["prediction"][corrupted],
                               got["metrics_aux"]["0.0"]["prediction"][corrupted], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got["metrics_joint"]["0.0"]["prediction"], got["metrics_aux"]["0.0"]["prediction"])
